"""Read checkpoint files without running code from them.

``torch.load`` is driven with a restricted pickle module: its ``find_class`` hands out only what
rebuilds tensors (torch's own rebuild functions, dtypes, ``torch.Size``), plain containers, numpy
array/scalar reconstruction, and inert stand-ins for the configuration objects real checkpoints
pickle (omegaconf's ``DictConfig`` tree in fairseq >= 0.10, ``argparse.Namespace`` before that).
Any other global (``os.system``, ``builtins.eval``, a model class, ...) is refused with a
:class:`CheckpointError` naming it, before anything is called. ``to_plain`` turns the stand-ins
into dicts and lists.
"""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import io
import pickle
import tarfile
import typing
import zipfile
from pathlib import Path

import torch

from deltalm.errors import CheckpointError

__all__ = [
    "safe_torch_load",
    "load_safetensors",
    "to_plain",
    "DictConfig",
    "ListConfig",
    "ValueNode",
    "Namespace",
]


# --- inert stand-ins ------------------------------------------------------------------------------


class _Bag:
    """Plain attribute holder: pickle's BUILD fills it with the saved ``__dict__``; no behaviour."""

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({to_plain(self)!r})"


class DictConfig(_Bag):
    """Stand-in for ``omegaconf.dictconfig.DictConfig``: ``_content`` maps keys to nodes."""

    def __getitem__(self, key):
        return to_plain(self._nodes()[key])

    def __contains__(self, key) -> bool:
        return key in self._nodes()

    def get(self, key, default=None):
        nodes = self._nodes()
        return to_plain(nodes[key]) if key in nodes else default

    def keys(self):
        return self._nodes().keys()

    def _nodes(self) -> dict:
        content = self.__dict__.get("_content")
        return content if isinstance(content, dict) else {}


class ListConfig(_Bag):
    """Stand-in for ``omegaconf.listconfig.ListConfig``: ``_content`` is a list of nodes."""


class ValueNode(_Bag):
    """Stand-in for omegaconf's leaf nodes (AnyNode, StringNode, ...): the value is ``_val``."""


class OmegaConfMetadata(_Bag):
    """Stand-in for ``omegaconf.base.Metadata`` / ``ContainerMetadata`` (types, flags, key)."""


class Namespace(_Bag):
    """Stand-in for ``argparse.Namespace`` (fairseq's ``args`` before 0.10)."""

    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)


def to_plain(obj):
    """Config stand-ins (DictConfig, ListConfig, nodes, Namespace) -> dicts / lists, recursively.
    Everything else is returned as is (containers are rebuilt with converted items)."""
    return _to_plain(obj, {})


def _to_plain(obj, seen: dict):
    key = id(obj)
    if key in seen:  # omegaconf nodes point back at their parents
        return seen[key]
    if isinstance(obj, DictConfig):
        content = obj.__dict__.get("_content")
        if not isinstance(content, dict):
            return content  # None, "???" (missing) or an unresolved "${...}" interpolation
        out: dict = {}
        seen[key] = out
        for k, v in content.items():
            out[k] = _to_plain(v, seen)
        return out
    if isinstance(obj, ListConfig):
        content = obj.__dict__.get("_content")
        if not isinstance(content, list):
            return content
        out_list: list = []
        seen[key] = out_list
        out_list.extend(_to_plain(v, seen) for v in content)
        return out_list
    if isinstance(obj, ValueNode):
        return _to_plain(obj.__dict__.get("_val"), seen)
    if isinstance(obj, Namespace):
        out = {}
        seen[key] = out
        for k, v in vars(obj).items():
            out[k] = _to_plain(v, seen)
        return out
    if isinstance(obj, dict):
        return {k: _to_plain(v, seen) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_plain(v, seen) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_plain(v, seen) for v in obj)
    return obj


# --- the allowlist --------------------------------------------------------------------------------


class _RefusedGlobal(Exception):
    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


def _latin1_encode(text, encoding="latin1"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"); no other codec is allowed.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_TENSOR_REBUILDERS = {
    name: getattr(torch._utils, name)
    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_meta_tensor_no_storage",
    )
    if hasattr(torch._utils, name)
}


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensors that carry Python attributes; only plain tensors / parameters are accepted.
    if func not in _TENSOR_REBUILDERS.values() or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise _RefusedGlobal(f"torch._tensor._rebuild_from_type_v2 for {getattr(new_type, '__name__', new_type)!r}")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _numpy_globals() -> dict:
    try:
        import numpy as np
    except ImportError:  # numpy is optional: only optimizer / XLM extras need it
        return {}

    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray

    def reconstruct(subtype, shape, dtype):
        if subtype is not np.ndarray:
            raise _RefusedGlobal(f"numpy array subtype {getattr(subtype, '__name__', subtype)!r}")
        return multiarray._reconstruct(subtype, shape, dtype)

    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = reconstruct
        table[(module, "scalar")] = multiarray.scalar
    return table


_OMEGACONF_NODES = (
    "AnyNode",
    "StringNode",
    "IntegerNode",
    "FloatNode",
    "BooleanNode",
    "EnumNode",
    "BytesNode",
    "PathNode",
    "ValueNode",
    "InterpolationResultNode",
)

_ALLOWED: dict[tuple[str, str], object] = {
    **{("torch._utils", name): fn for name, fn in _TENSOR_REBUILDERS.items()},
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._tensor", "Tensor"): torch.Tensor,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("_codecs", "encode"): _latin1_encode,
    **{
        ("builtins", t.__name__): t
        for t in (
            dict,
            list,
            tuple,
            set,
            frozenset,
            int,
            float,
            complex,
            bool,
            str,
            bytes,
            bytearray,
            slice,
            object,
        )
    },
    ("builtins", "NoneType"): type(None),
    **{
        ("typing", name): getattr(typing, name)
        for name in (
            "Any",
            "Dict",
            "List",
            "Tuple",
            "Optional",
            "Union",
            "Type",
            "Set",
        )
    },
    ("argparse", "Namespace"): Namespace,
    ("omegaconf.dictconfig", "DictConfig"): DictConfig,
    ("omegaconf.listconfig", "ListConfig"): ListConfig,
    ("omegaconf.base", "Metadata"): OmegaConfMetadata,
    ("omegaconf.base", "ContainerMetadata"): OmegaConfMetadata,
    **{("omegaconf.nodes", name): ValueNode for name in _OMEGACONF_NODES},
    **_numpy_globals(),
}


def _resolve_global(module: str, name: str, proto: int):
    if proto < 3 and (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif proto < 3:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    found = _ALLOWED.get((module, name))
    if found is not None:
        return found
    if module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype):
        return torch.__dict__[name]  # torch.float16 etc., pickled by name
    raise _RefusedGlobal(f"{module}.{name}")


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only hands out the allowlist above."""

    def find_class(self, module, name):
        return _resolve_global(module, name, getattr(self, "proto", 2))


def load(file, **kwargs):
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs):
    return Unpickler(io.BytesIO(data), **kwargs).load()


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` uses: ``Unpickler`` and ``load``."""

    Unpickler = Unpickler
    load = staticmethod(load)
    loads = staticmethod(loads)
    UnpicklingError = pickle.UnpicklingError


# --- loading --------------------------------------------------------------------------------------


def _check_file(path: Path) -> bytes:
    """Fail early, with one line, on what is not a readable checkpoint; returns the first bytes."""
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not head:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    return head


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e})") from None
    base = {n.rsplit("/", 1)[-1] for n in names}
    if "constants.pkl" in base:
        # torch.load would hand a TorchScript archive to torch.jit.load, which runs its code.
        raise CheckpointError(f"{path}: a TorchScript archive (code), not a state-dict checkpoint; refused")
    if "data.pkl" not in base:
        raise CheckpointError(f"{path}: a zip archive but not a PyTorch checkpoint (no data.pkl)")


def safe_torch_load(path: str | Path) -> object:
    """Load a ``torch.save`` file (zip or legacy format) onto the CPU without running its code.
    Zip files (every ``torch.save`` since torch 1.6) are memory-mapped (``torch.load(mmap=True)``, a
    private mapping: writing to a tensor never changes the file): a tensor's pages are read when
    first touched, and what is never touched (an optimizer's state) is never read. A checkpoint
    replaced by a rename while it is mapped (as fairseq saves) is safe; one rewritten in place is not.

    Raises CheckpointError, one line naming the file, for a missing / empty / truncated / foreign
    file and for any pickled global outside the allowlist (named as ``module.attr``)."""
    path = Path(path)
    head = _check_file(path)
    if head.startswith(b"PK\x03\x04"):
        _check_zip(path)
    elif not head.startswith(b"\x80") and not _is_tar(path):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (starts with bytes {head[:4].hex(' ')}, "
            "expected a zip archive or a pickle)"
        )
    try:
        # A zip checkpoint is mapped, not read: a tensor's bytes come from the file when they are
        # used, and those never used (fairseq's optimizer state) never are.
        return torch.load(
            path,
            map_location="cpu",
            weights_only=False,
            mmap=head.startswith(b"PK\x03\x04"),
            pickle_module=_RestrictedPickleModule,
        )
    except _RefusedGlobal as e:
        raise CheckpointError(
            f"{path}: refused to load: it references {e.qualname}, which is not plain data "
            "(unpickling it could run code)"
        ) from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes torch.load raise (even AssertionError)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: truncated or corrupt PyTorch checkpoint ({type(e).__name__}: {detail})"
        ) from None


def _is_tar(path: Path) -> bool:
    # Very old torch (< 0.4) wrote tar archives; torch.load still reads them (through our unpickler).
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file -> {name: tensor} on the CPU (the format holds no code)."""
    from safetensors.torch import load_file

    path = Path(path)
    _check_file(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... for a damaged file
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a valid safetensors file ({detail})") from None
