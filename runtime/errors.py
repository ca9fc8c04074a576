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


def install_extra(extra: str) -> str:
    """How to install an optional extra, for a message (the package is installed from its
    checkout, not from a package index)."""
    return f"pip install '.[{extra}]' in the deltalm-deploy checkout"
