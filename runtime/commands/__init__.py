"""Command modules of the ``deltalm`` CLI: each parses its arguments and calls the library."""
