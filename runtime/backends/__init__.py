"""Backends compute; the search engine (runtime/search.py) decides. The contract is ``Backend``:
a backend runs the artifact's two graphs, nothing else. Everything around them (which rows live,
their caches, the rules of each row) is the caller's, handed over as the step graph's feeds, which
``step_feeds`` builds in one place from the graph's declaration (``deltalm.graphs``).

``load_backend`` imports a backend only when asked for: the torch backend lives in export/
(it needs torch), the others here.
"""

from __future__ import annotations

from ..errors import InputError
from .interface import Backend, BatchLimits, Encoded, StepOutput, step_feeds

__all__ = ["BACKENDS", "Backend", "BatchLimits", "Encoded", "StepOutput", "step_feeds", "load_backend"]

BACKENDS = ("torch", "ort", "trt")


def load_backend(name: str, source, **options) -> Backend:
    """source: a checkpoint spec (torch) or an artifact directory (ort, trt)."""
    if name == "torch":
        from deltalm.export.torch_backend import TorchBackend

        return TorchBackend.from_source(source, **options)
    if name == "ort":
        from .ort import OrtBackend

        return OrtBackend.from_artifact(source, **options)
    if name == "trt":
        from .trt import TrtBackend

        return TrtBackend.from_artifact(source, **options)
    raise InputError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
