"""``python -m deltalm ...``: the ``deltalm`` command."""
import sys

from .cli import main

sys.exit(main())
