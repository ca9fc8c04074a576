"""Everything that needs PyTorch: checkpoint loaders, the model, ONNX export, engine build.

The public entry points (``export_checkpoint``, ``inspect_checkpoint``, ``check_parity``) import
torch only when called.
"""

from .pipeline import PRECISIONS, check_parity, export_checkpoint, inspect_checkpoint

__all__ = ["export_checkpoint", "inspect_checkpoint", "check_parity", "PRECISIONS"]
