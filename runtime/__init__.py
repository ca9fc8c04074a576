"""DeltaLM deployment: fairseq-exact translation with ONNX Runtime / TensorRT, no torch needed.

    import deltalm

    with deltalm.Translator("model_dir") as translator:
        print(translator.translate_batch(["Hallo Welt!"], beam=5)[0].text)

The export side (``export_checkpoint``, ``inspect_checkpoint``, ``check_parity``) needs the
``export`` extra (torch, onnx) and is imported only when used.
"""

from importlib import metadata as _metadata

from .artifact import Artifact, open_artifact
from .errors import ArtifactError, CheckpointError, DeltaLMError, ExportError, InputError, SentenceError, TokenizerError
from .options import OptionError, TranslateOptions
from .search import Engine, Finished, Hypothesis, Partial, Sentence
from .shortlist import Shortlist, build_shortlist, shortlist_from_corpus
from .translator import PartialTranslation, Translation, Translator

try:
    __version__ = _metadata.version("deltalm-deploy")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORT_NAMES = ("export_checkpoint", "inspect_checkpoint", "check_parity")


def __getattr__(name: str):
    if name in _EXPORT_NAMES:  # lazily: they need torch
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module 'deltalm' has no attribute {name!r}")


__all__ = [
    "Translator",
    "Translation",
    "PartialTranslation",
    "Hypothesis",
    "TranslateOptions",
    "Engine",
    "Sentence",
    "Partial",
    "Finished",
    "Artifact",
    "open_artifact",
    "Shortlist",
    "build_shortlist",
    "shortlist_from_corpus",
    "DeltaLMError",
    "InputError",
    "OptionError",
    "SentenceError",
    "ArtifactError",
    "CheckpointError",
    "TokenizerError",
    "ExportError",
    "__version__",
    *_EXPORT_NAMES,
]
