"""Errors that are part of the interface: the CLI prints ``str(error)`` as one line (no traceback
unless --debug) and exits non-zero."""


class DeltaLMError(Exception):
    """Base class of every error meant for the user."""


class InputError(DeltaLMError):
    """Bad user input: text, options, files given on the command line."""


class TokenizerError(DeltaLMError):
    """A missing or corrupt spm.model / dict.txt."""


class CheckpointError(DeltaLMError):
    """A checkpoint that cannot be read, is of an unknown format, or has wrong tensors."""


class ArtifactError(DeltaLMError):
    """An artifact directory that is incomplete, corrupt, or built for something else."""


class ExportError(DeltaLMError):
    """The export ran but its result is not acceptable (parity failed...)."""


class SentenceError(InputError):
    """One input sentence the model cannot take. ``index`` is its 0-based position in the input
    (the command line shows line ``index + 1``; the HTTP API ``sentence index``), ``reason`` says
    what is wrong with it, without the position: a predicate ("is not valid UTF-8 ...", "has 600
    source tokens ...") or, for an error of another layer, its message. ``source`` names the input
    (a file) in the message; "input" when None."""

    def __init__(self, index: int, reason: str, source: str | None = None):
        self.index, self.reason, self.source = index, reason, source
        joint = " " if reason.startswith(("is ", "has ")) else ": "
        super().__init__(f"{source or 'input'} line {index + 1}{joint}{reason}")


class SentenceTooLong(SentenceError):
    """A sentence with more source tokens (``length``, ``</s>`` and the source prefix included)
    than the model's positions (``limit``), translated without ``truncate``."""

    def __init__(self, index: int, length: int, limit: int, source: str | None = None):
        self.length, self.limit = length, limit
        super().__init__(
            index,
            f"has {length} source tokens (with </s> and the source prefix); the model takes at "
            f"most {limit}. Pass --truncate to cut it",
            source,
        )


class DecodeError(DeltaLMError):
    """The backend failed while encoding or decoding a batch. ``keys`` are the sentences it was
    working on (as the caller named them to ``Engine.add``); ``cause`` the backend's exception."""

    def __init__(self, keys: list, cause: BaseException, message: str | None = None):
        self.keys, self.cause = list(keys), cause
        super().__init__(message or f"decoding failed: {type(cause).__name__}: {cause}")


def install_extra(extra: str) -> str:
    """How to install an optional extra, for a message (the package is installed from its
    checkout, not from a package index)."""
    return f"pip install '.[{extra}]' in the deltalm-deploy checkout"
