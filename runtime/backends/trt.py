"""TensorRT backend: the engines ``deltalm engines DIR`` built from the artifact's ``encoder`` and
``decoder_step`` graphs, behind the ``Backend`` contract of ``deltalm.backends.interface``
(``encode`` and ``run_step``), like the ONNX Runtime backend.

Supported TensorRT: ``TENSORRT_SUPPORTED`` (10.12 up to 11.x: the versions that build strongly typed
networks). The runtime uses only calls that TensorRT 11 kept (checked against NVIDIA's list of
removed Python APIs, docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/
tensorrt-10x-to-11x-python-api-reference.html): ``Runtime.deserialize_cuda_engine``,
``create_execution_context``, ``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_dtype`` /
``get_tensor_profile_shape`` / ``is_shape_inference_io``, ``set_input_shape``,
``set_tensor_address``, ``set_output_allocator`` (an ``IOutputAllocator``), ``execute_async_v3``;
never ``device_memory_size*``, builder flags or calibrators. Device memory comes from Polygraphy's
CUDA wrapper (``polygraphy.cuda``: plain ``cudaMalloc``, never managed memory) and is allocated
ONCE, at construction, for the largest shapes of the engines' optimization profile and the whole
vocabulary (``plan_buffers``, ``device_allocations``): nothing is allocated per batch or per step.
GPU 0 only; ``threads`` is accepted for interface parity and ignored.

Where the data lives: on the host, owned by the search (``deltalm.batch.DecoderBatch``), exactly
as with the ONNX Runtime backend.
- ``encode`` runs the encoder engine and copies the cross-attention K/V back into host arrays
  (``Encoded``); the search keeps them per sentence.
- ``run_step`` copies every feed to its device buffer (the live self-attention caches and cross
  K/V included), sets the input shapes, runs the step and copies every output back for the actual
  shapes: top-k, token scores, the step's new K/V (the search writes them into its caches) and
  the log-probs when they are asked for.

Not implemented: a device-resident batch (caches and cross K/V kept on the GPU, the new K/V
written and the beam reorders and retirements applied there). What that costs: every step copies
the live caches to the device, 2 x layers x rows x heads x positions x head_dim values (deltalm-base
fp16, 40 rows at position 128: 12 x 40 x 12 x 128 x 64 x 2 bytes = 94 MB), plus the cross K/V
(2 x layers x sentences x heads x source x head_dim) and the fed tokens and rules, and copies the
new K/V back (one position per row). At PCIe speeds (roughly 10 to 25 GB/s from pageable
memory) that is milliseconds per step, growing with the target length, and may well exceed the
step itself for long targets and large batches (never measured: no GPU was lent to this work). Also not
implemented: CUDA-graph capture of the step; pinned (page-locked) host buffers; several
optimization profiles (one profile, index 0, serves every shape); scoring whole targets in one
step (the default profile fixes ``new_len`` at 1: see ``deltalm.export.engines``); bf16 engine
I/O (numpy has no bf16).

Two things TensorRT may decide about the step graph, both handled as NVIDIA documents them:
``log_probs`` has an axis that no input shape gives (``vocab``: the vocabulary, or 0 unless
``want_log_probs``), so its shape may be known only after execution; it gets an ``IOutputAllocator``
that hands TensorRT the buffer allocated at construction (it never allocates) and reports the
shape. And an input TensorRT uses for shape calculations (``is_shape_inference_io``, e.g.
``want_log_probs`` if the slice of the log-probs is computed from it) must be given in host
memory: such inputs are bound from the host array.

Capacity axes: the search grows its caches and its source width by chunks of 16 positions
(``DecoderBatch``), so the arrays it feeds are often wider than its rows use; the graph ignores
cache entries at or beyond a row's position and source padding. Where such an axis is larger than
the profile allows, ``run_step`` copies only the part in use (``fit_to_profile``), so that
``--max-tgt-len`` and ``--max-src-len`` count target and source tokens, not capacities.

Importing this module needs neither TensorRT nor CUDA: everything that touches them is imported
inside the functions that use it. The pure functions (profiles, buffer plans, profile fitting,
compatibility checks) are tested without a GPU.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from ..artifact import Artifact, check_can_decode, open_artifact
from ..config import ModelConfig
from ..errors import ArtifactError, DeltaLMError, InputError
from ..graphs import GraphSpec, cross_names, per_layer
from .interface import BatchLimits, Encoded, StepOutput, step_output_shapes

ENGINE_GRAPHS = ("encoder", "decoder_step")
# The one statement of the supported TensorRT versions: first supported, first unsupported.
# 10.12 is the first with strongly typed networks as the way to build (weak typing deprecated);
# 11.x builds nothing else. 12 is refused until someone has checked its removals.
TENSORRT_SUPPORTED = ((10, 12), (12, 0))
MIN_ALLOCATION = 256  # bytes: never hand TensorRT a null pointer, even for an empty tensor

# TensorRT DataType names -> numpy (bf16 has no numpy dtype: such I/O is refused)
_TRT_TO_NUMPY = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "INT8": "int8",
    "UINT8": "uint8",
}


# ---------------------------------------------------------------------------------------------
# pure logic: profiles, buffers, compatibility (no TensorRT, no CUDA)


def profile_axes(spec: GraphSpec, profile: dict) -> dict[str, tuple[int, int, int]]:
    """Per symbolic axis of the inputs of ``spec``, (min, opt, max), read off a per-input profile
    ``{input: (min_shape, opt_shape, max_shape)}``. Every input that shares an axis must give it
    the same bounds (else InputError naming both)."""
    axes: dict[str, tuple[int, int, int]] = {}
    origin: dict[str, str] = {}
    for t in spec.inputs:
        if t.name not in profile:
            continue
        lo, opt, hi = (tuple(int(d) for d in s) for s in profile[t.name])
        for i, d in enumerate(t.shape):
            if not isinstance(d, str):
                continue
            bounds = (lo[i], opt[i], hi[i])
            if d in axes and axes[d] != bounds:
                raise InputError(
                    f"profile: axis {d!r} differs between {spec.name}.{origin[d]} "
                    f"({_span(axes[d])}) and {spec.name}.{t.name} ({_span(bounds)})"
                )
            axes.setdefault(d, bounds)
            origin.setdefault(d, t.name)
    return axes


def _span(bounds) -> str:
    return f"{bounds[0]}/{bounds[1]}/{bounds[2]}"


def vocabulary_axis(cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """The step's output-only axis: ``log_probs`` [rows, new_len, vocab] has the whole vocabulary,
    or 0 columns unless ``want_log_probs``."""
    return {"vocab": (0, cfg.vocab_size, cfg.vocab_size)}


def plan_buffers(
    spec: GraphSpec, profile: dict, dtypes: dict[str, str] | None = None, output_axes: dict | None = None
) -> dict[str, tuple[tuple, np.dtype, int]]:
    """The device buffer of every input and output of ``spec`` at the profile's maximum:
    ``{name: (max_shape, dtype, nbytes)}``. ``output_axes`` bounds the axes no input has
    (``vocabulary_axis``); ``dtypes`` overrides the spec's dtypes (an engine's I/O types, e.g.
    int32 top-k ids). Scalars have shape () and one element."""
    axes = profile_axes(spec, profile) | (output_axes or {})
    plan = {}
    for t in spec.inputs + spec.outputs:
        shape = []
        for d in t.shape:
            if isinstance(d, str):
                if d not in axes:
                    raise ArtifactError(f"{spec.name}.{t.name}: the profile does not bound axis {d!r}")
                shape.append(axes[d][2])
            else:
                shape.append(int(d))
        dtype = np.dtype((dtypes or {}).get(t.name, t.dtype))
        plan[t.name] = (tuple(shape), dtype, math.prod(shape) * dtype.itemsize)
    return plan


def device_allocations(encoder_plan: dict, step_plan: dict, decoder_layers: int) -> dict[str, int]:
    """Bytes of every device buffer ``TrtBackend`` allocates, keyed ``graph:tensor``: every input
    and output of the encoder and of the step, except the step's cross K/V inputs, which use the
    encoder's cross K/V output buffers (``encode`` and ``run_step`` never overlap: each finishes
    its copies before it returns), sized for the larger of the two. At least MIN_ALLOCATION each."""
    cross = {n for i in range(decoder_layers) for n in cross_names(i)}
    alloc = {f"encoder:{n}": max(b, MIN_ALLOCATION) for n, (_, _, b) in encoder_plan.items()}
    for n, (_, _, b) in step_plan.items():
        if n in cross:
            alloc[f"encoder:{n}"] = max(alloc[f"encoder:{n}"], b)
        else:
            alloc[f"decoder_step:{n}"] = max(b, MIN_ALLOCATION)
    return alloc


_AXIS_HINTS = {
    "rows": ("batch x beam = {v} rows", "--max-batch/--max-beam"),
    "batch": ("a batch of {v} sentences", "--max-batch (or translate with a smaller --batch-size)"),
    "sents": ("a batch of {v} sentences", "--max-batch (or translate with a smaller --batch-size)"),
    "src_len": ("a source of {v} tokens", "--max-src-len"),
    "cache_len": ("target length {v}", "--max-tgt-len (or translate with a smaller --max-len-b)"),
    "new_len": (
        "{v} tokens fed per row",
        "a --profile whose tokens allow it (scoring whole targets runs on the ort backend)",
    ),
    "score_width": ("{v} scored ids per position", "a --profile whose score_ids allow it"),
}


def check_within_profile(axes: dict[str, tuple[int, int, int]], shapes: dict[str, int]) -> None:
    """Raise InputError when a shape is outside the engine's profile, instead of letting
    TensorRT fail. ``axes``: {axis: (min, opt, max)} (``profile_axes``); ``shapes``: {axis:
    value} for the call about to run. Axes the profile does not bound are ignored."""
    for axis, value in shapes.items():
        if axis not in axes:
            continue
        lo, _, hi = axes[axis]
        what, option = _AXIS_HINTS.get(axis, (axis + " = {v}", "a wider --profile"))
        if value > hi:
            raise InputError(
                f"{what.format(v=value)} exceeds the engine profile maximum {hi}; rebuild engines with {option}"
            )
        if value < lo:
            raise InputError(
                f"{what.format(v=value)} is below the engine profile minimum {lo}; "
                f"rebuild engines with a --profile that allows it"
            )


def feed_axes(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """The size of every symbolic axis of ``spec``'s inputs in ``feeds`` (read off the first input
    that has it)."""
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        for d, n in zip(t.shape, np.shape(feeds[t.name])):
            if isinstance(d, str):
                sizes.setdefault(d, int(n))
    return sizes


def fit_to_profile(
    spec: GraphSpec, axes: dict[str, tuple[int, int, int]], feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The step's ``feeds`` as an engine of profile ``axes`` takes them. A capacity axis wider than
    the profile allows is cut to the part in use, which the graph alone reads: ``cache_len`` to the
    largest of ``positions`` (a row reads its cache at [0, position)), ``src_len`` to the last
    column that is not padding in some sentence. Cut inputs are views (the copy to the device
    gathers them); nothing is cut, and ``feeds`` is returned as it is, when everything fits.
    InputError (``check_within_profile``) when an axis is outside the profile even so."""
    sizes = feed_axes(spec, feeds)
    cut = {}
    if "cache_len" in axes and sizes.get("cache_len", 0) > axes["cache_len"][2]:
        cut["cache_len"] = int(np.max(feeds["positions"], initial=0))
    if "src_len" in axes and sizes.get("src_len", 0) > axes["src_len"][2]:
        used = np.flatnonzero(~np.asarray(feeds["src_padding"]).all(axis=0))
        cut["src_len"] = int(used[-1]) + 1 if used.size else 1
    check_within_profile(axes, sizes | cut)
    if not cut:
        return feeds
    fitted = {}
    for t in spec.inputs:
        if cut.keys() & set(t.shape):
            fitted[t.name] = feeds[t.name][tuple(slice(0, cut[d]) if d in cut else slice(None) for d in t.shape)]
        else:
            fitted[t.name] = feeds[t.name]
    return fitted


def graph_source_digest(manifest, graph: str) -> str:
    """The sha256 an engine of ``graph`` records for its source: the .onnx file's sha256 from the
    manifest, or, for a graph with external weights (.onnx + .data), the sha256 of its files'
    ``name sha256`` lines, so that new weights in the .data file count as another source."""
    import hashlib

    try:
        digests = {f: manifest.files[f] for f in manifest.graphs[graph].files}
    except KeyError as e:
        raise ArtifactError(f"the manifest does not hash the files of graph {graph!r} ({e})") from None
    if len(digests) == 1:
        return next(iter(digests.values()))
    lines = "".join(f"{name} {digests[name]}\n" for name in sorted(digests))
    return hashlib.sha256(lines.encode()).hexdigest()


def check_engine_compat(
    meta: dict, onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability: str, where: str = ""
) -> None:
    """Refuse an engine (metadata written by ``deltalm engines``) that was built from another
    ONNX file, with another TensorRT version, or for another GPU: TensorRT engines load only in
    the version that built them and are tuned for (and may only run on) one GPU model. Raises
    ArtifactError naming every mismatch."""
    name = meta.get("file", meta.get("graph", "engine"))
    problems = []
    if meta.get("onnx_sha256") != onnx_sha256:
        problems.append(
            f"it was built from another {meta.get('onnx', 'ONNX file')} "
            f"(sha256 {str(meta.get('onnx_sha256'))[:12]}..., the artifact's is {onnx_sha256[:12]}...)"
        )
    if meta.get("tensorrt") != trt_version:
        problems.append(f"it was built with TensorRT {meta.get('tensorrt')}, this is TensorRT {trt_version}")
    if meta.get("compute_capability") != compute_capability:
        problems.append(
            f"it was built for compute capability {meta.get('compute_capability')} "
            f"({meta.get('gpu')}), this GPU ({gpu_name}) has {compute_capability}"
        )
    elif meta.get("gpu") != gpu_name:
        problems.append(f"it was built on a {meta.get('gpu')}, this GPU is a {gpu_name}")
    if problems:
        target = f"deltalm engines {where}" if where else "deltalm engines DIR"
        raise ArtifactError(f"engine {name}: " + "; ".join(problems) + f"; rebuild the engines with `{target}`")


def numpy_dtype(trt_dtype_name: str) -> np.dtype:
    """numpy dtype of a TensorRT DataType given by its name (``FLOAT``, ``HALF``, ``INT64``...)."""
    try:
        return np.dtype(_TRT_TO_NUMPY[trt_dtype_name.upper()])
    except KeyError:
        raise ArtifactError(f"engine I/O of TensorRT type {trt_dtype_name} is not supported by this backend") from None


def profile_from_json(data: dict) -> dict:
    """``{input: {"min": [...], "opt": [...], "max": [...]}}`` -> ``{input: (min, opt, max)}``."""
    return {name: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for name, v in data.items()}


def profile_to_json(profile: dict) -> dict:
    return {name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in profile.items()}


# ---------------------------------------------------------------------------------------------
# the GPU and TensorRT (imported lazily)


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of CUDA device ``device``, read through the CUDA
    driver library (libcuda); DeltaLMError when there is no NVIDIA driver or GPU."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise DeltaLMError("no NVIDIA driver found (libcuda.so.1): TensorRT needs a CUDA GPU") from None
    if cuda.cuInit(0) != 0:
        raise DeltaLMError("no usable CUDA GPU (cuInit failed)")
    dev = ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(dev), device) != 0:
        raise DeltaLMError(f"no CUDA device {device}")
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetName(name, 256, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"


def supported_tensorrt() -> str:
    """``TENSORRT_SUPPORTED`` in words: "10.12 or newer (up to 11.x)"."""
    (lo_major, lo_minor), (hi_major, _) = TENSORRT_SUPPORTED
    return f"{lo_major}.{lo_minor} or newer (up to {hi_major - 1}.x)"


def check_tensorrt_version(version: str) -> None:
    """DeltaLMError in one line when TensorRT ``version`` is outside ``TENSORRT_SUPPORTED``."""
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        raise DeltaLMError(
            f"cannot read the TensorRT version {version!r}; deltalm needs TensorRT {supported_tensorrt()}"
        ) from None
    lo, hi = TENSORRT_SUPPORTED
    if (major, minor) < lo:
        raise DeltaLMError(
            f"TensorRT {version} is too old: deltalm needs TensorRT {lo[0]}.{lo[1]} or newer "
            f"(strongly typed networks); `pip install -U tensorrt`"
        )
    if (major, minor) >= hi:
        raise DeltaLMError(
            f"TensorRT {version} is not supported yet: deltalm is written for TensorRT {supported_tensorrt()}"
        )


def import_tensorrt():
    """The ``tensorrt`` module, if its version is supported (else DeltaLMError in one line)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise DeltaLMError(
            "TensorRT is not installed (no `tensorrt` Python module); --backend trt and "
            f"`deltalm engines` need TensorRT {supported_tensorrt()}"
        ) from None
    check_tensorrt_version(str(trt.__version__))
    return trt


def _import_cuda():
    try:
        from polygraphy import cuda
    except ImportError:
        raise DeltaLMError(
            "--backend trt needs Polygraphy (the `polygraphy` Python module) for device memory; it is not installed"
        ) from None
    return cuda


def read_engine_metadata(artifact: Artifact) -> dict:
    """engines/engines.json of an artifact (hash-checked by open_artifact with the other files)."""
    section = artifact.manifest.engines
    if section is None:
        raise ArtifactError(f"{artifact.path}: no TensorRT engines; build them with `deltalm engines {artifact.path}`")
    path = artifact.path / section.metadata
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: cannot read the engine metadata ({e})") from None


class _Engine:
    """One deserialized engine, its execution context and its device buffers."""

    def __init__(self, runtime, path, spec: GraphSpec, output_axes: dict | None = None):
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ArtifactError(f"{path}: TensorRT cannot deserialize this engine (see the TensorRT log above)")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise ArtifactError(f"{path}: TensorRT cannot create an execution context (out of device memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        missing = sorted(set(spec.input_names + spec.output_names) - set(names))
        if missing:
            raise ArtifactError(f"{path}: the engine lacks tensors of the {spec.name} graph: {', '.join(missing)}")
        self.dtypes = {n: numpy_dtype(engine.get_tensor_dtype(n).name) for n in names}
        self.dynamic = {t.name for t in spec.inputs if t.dynamic_axes()}
        # inputs TensorRT computes shapes from: it reads them from host memory
        self.host_inputs = {n for n in spec.input_names if engine.is_shape_inference_io(n)}
        self.profile = {}  # the engine's own profile 0, not the metadata's copy of it
        for t in spec.inputs:
            if t.name in self.dynamic:
                lo, opt, hi = engine.get_tensor_profile_shape(t.name, 0)
                self.profile[t.name] = (tuple(lo), tuple(opt), tuple(hi))
            else:
                self.profile[t.name] = (tuple(t.shape),) * 3
        self.axes = profile_axes(spec, self.profile)
        self.plan = plan_buffers(spec, self.profile, {n: str(d) for n, d in self.dtypes.items()}, output_axes)
        self.buffers: dict[str, Any] = {}  # name -> polygraphy DeviceArray (untyped), filled by the backend


def _preallocated_outputs(trt, buffers: dict):
    """An ``IOutputAllocator`` for outputs whose shape TensorRT may know only once it has run: it
    hands TensorRT the buffer allocated at construction (``buffers``: name -> DeviceArray) and never
    allocates (a request larger than the buffer gets None, which fails the execution), and it
    records the shapes TensorRT reports."""

    class PreallocatedOutputs(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.shapes = {}

        def reallocate_output(self, tensor_name, memory, size, alignment):
            buf = buffers[tensor_name]
            return buf.ptr if size <= buf.nbytes else None

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

    return PreallocatedOutputs()


class TrtBackend:
    """The ``Backend`` contract over TensorRT engines; see the module docstring for where the data
    lives and what is not implemented."""

    def __init__(self, artifact: Artifact, device: str = "cuda", threads: int | None = None):
        if device != "cuda":
            raise InputError("--backend trt runs on --device cuda only")
        self.artifact = artifact
        self.cfg = artifact.config
        check_can_decode(artifact)
        meta = read_engine_metadata(artifact)
        trt = import_tensorrt()
        cuda = _import_cuda()
        gpu_name, capability = gpu_identity()
        for graph in ENGINE_GRAPHS:
            if graph not in meta.get("engines", {}):
                raise ArtifactError(
                    f"{artifact.path}: no {graph} engine; rebuild with `deltalm engines {artifact.path}`"
                )
            check_engine_compat(
                meta["engines"][graph],
                graph_source_digest(artifact.manifest, graph),
                trt.__version__,
                gpu_name,
                capability,
                where=str(artifact.path),
            )
        self.trt = trt
        self.cuda = cuda
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = cuda.Stream()
        self.encoder_spec = artifact.graph_spec("encoder")
        self.step_spec = artifact.graph_spec("decoder_step")
        self._cross_names = per_layer(self.cfg, cross_names)
        engine_path = {g: artifact.path / meta["engines"][g]["file"] for g in ENGINE_GRAPHS}
        self.encoder = _Engine(self.runtime, engine_path["encoder"], self.encoder_spec)
        self.step_engine = _Engine(self.runtime, engine_path["decoder_step"], self.step_spec, vocabulary_axis(self.cfg))
        for name in self._cross_names:  # one buffer serves both: both engines must agree on the type
            if self.encoder.dtypes[name] != self.step_engine.dtypes[name]:
                raise ArtifactError(
                    f"{artifact.path}: the encoder engine writes {name} as {self.encoder.dtypes[name]}, "
                    f"the decoder_step engine reads {self.step_engine.dtypes[name]}"
                )
        # allocated once, here; the step's cross K/V inputs use the encoder's output buffers
        self._memory = {}
        engines = {"encoder": self.encoder, "decoder_step": self.step_engine}
        for key, nbytes in device_allocations(
            self.encoder.plan, self.step_engine.plan, self.cfg.decoder_layers
        ).items():
            buf = self._memory[key] = cuda.DeviceArray(shape=(nbytes,), dtype=np.uint8)
            graph, name = key.split(":")
            engines[graph].buffers[name] = buf
        for name in self._cross_names:
            self.step_engine.buffers[name] = self.encoder.buffers[name]
        # log_probs: an output axis no input shape gives (vocab), so possibly a data-dependent shape
        output_only = set(vocabulary_axis(self.cfg))
        self._allocated = [t.name for t in self.step_spec.outputs if output_only & set(t.shape)]
        self._allocator = _preallocated_outputs(trt, {n: self.step_engine.buffers[n] for n in self._allocated})
        for name in self._allocated:
            if not self.step_engine.context.set_output_allocator(name, self._allocator):
                raise ArtifactError(f"TensorRT refused an output allocator for {name}")
        self.topk = int(self.step_spec.outputs[0].shape[-1])
        self.float_dtype = self.step_engine.dtypes[self._cross_names[0]]
        self.max_target_len = self.step_engine.axes["cache_len"][2]
        self.limits = BatchLimits(rows=self.step_engine.axes["rows"][2], sentences=self.step_engine.axes["sents"][2])

    @classmethod
    def from_artifact(cls, path, device: str = "cuda", threads: int | None = None, **_) -> TrtBackend:
        return cls(open_artifact(path), device=device, threads=threads)

    def close(self) -> None:
        """Free the device memory (the backend is unusable afterwards). Idempotent."""
        if not self._memory:
            return
        self.stream.synchronize()
        for buf in self._memory.values():
            buf.free()
        self._memory = {}
        self.encoder.buffers, self.step_engine.buffers = {}, {}
        self.stream.free()

    # -- device copies ----------------------------------------------------------------------

    def _to_device(self, engine: _Engine, name: str, array) -> np.ndarray:
        host = np.require(array, dtype=engine.dtypes[name], requirements="C")  # keeps a scalar 0-D
        if host.nbytes:
            self.cuda.wrapper().memcpy(
                engine.buffers[name].ptr,
                host.ctypes.data,
                host.nbytes,
                self.cuda.MemcpyKind.HostToDevice,
                self.stream.ptr,
            )
        return host  # the caller keeps it alive until the stream is synchronized

    def _to_host(self, engine: _Engine, name: str, shape: tuple) -> np.ndarray:
        host = np.empty(shape, dtype=engine.dtypes[name])
        if host.nbytes:
            self.cuda.wrapper().memcpy(
                host.ctypes.data,
                engine.buffers[name].ptr,
                host.nbytes,
                self.cuda.MemcpyKind.DeviceToHost,
                self.stream.ptr,
            )
        return host

    def _bind(self, engine: _Engine, name: str, ptr: int, shape: tuple | None = None) -> None:
        if shape is not None and name in engine.dynamic and not engine.context.set_input_shape(name, shape):
            raise InputError(f"TensorRT refused shape {shape} for {name} (outside the engine profile)")
        if not engine.context.set_tensor_address(name, ptr):
            raise ArtifactError(f"TensorRT refused the address of {name}")

    def _bind_input(self, engine: _Engine, name: str, array) -> np.ndarray:
        """Copy input ``name`` to its device buffer (or, for an input TensorRT computes shapes
        from, keep it on the host) and bind it; returns the host array to keep alive."""
        if name in engine.host_inputs:
            host = np.require(array, dtype=engine.dtypes[name], requirements="C")
            self._bind(engine, name, host.ctypes.data, host.shape)
            return host
        host = self._to_device(engine, name, array)
        self._bind(engine, name, engine.buffers[name].ptr, host.shape)
        return host

    def _run(self, engine: _Engine) -> None:
        if not engine.context.execute_async_v3(self.stream.ptr):
            raise DeltaLMError("TensorRT execution failed (see the TensorRT log above)")

    # -- the backend interface --------------------------------------------------------------

    def encode(self, src_tokens: np.ndarray) -> Encoded:
        """src_tokens [batch, src_len] int64, left-padded -> the cross K/V, copied to the host."""
        src = np.require(src_tokens, dtype=np.int64, requirements="C")
        batch, src_len = src.shape
        check_within_profile(self.encoder.axes, {"batch": batch, "src_len": src_len})
        enc, cfg = self.encoder, self.cfg
        keep = self._bind_input(enc, "src_tokens", src)
        for name in self.encoder_spec.output_names:
            self._bind(enc, name, enc.buffers[name].ptr)
        self._run(enc)
        cross = [self._to_host(enc, name, (batch, cfg.heads, src_len, cfg.head_dim)) for name in self._cross_names]
        self.stream.synchronize()
        del keep
        return Encoded(cross=cross, padding=src == cfg.pad)

    def run_step(self, feeds: dict[str, np.ndarray]) -> StepOutput:
        """One run of the step engine on ``feeds`` (every input of ``step_spec``): each feed is
        copied to the device (capacity axes cut to the profile: ``fit_to_profile``), every output
        copied back for its actual shape."""
        eng = self.step_engine
        feeds = fit_to_profile(self.step_spec, eng.axes, feeds)
        keep = [self._bind_input(eng, t.name, feeds[t.name]) for t in self.step_spec.inputs]
        shapes = step_output_shapes(self.cfg, self.step_spec, feeds)
        for name in shapes:
            if name not in self._allocated:
                self._bind(eng, name, eng.buffers[name].ptr)
        self._allocator.shapes.clear()
        self._run(eng)
        for name in self._allocated:  # TensorRT reports these shapes while it runs
            got, want = self._allocator.shapes.get(name), shapes[name][0]
            if got != want:
                raise DeltaLMError(f"TensorRT gave {name} the shape {got}; the step graph declares {want}")
        outputs = {name: self._to_host(eng, name, shape) for name, (shape, _) in shapes.items()}
        self.stream.synchronize()
        del keep
        return StepOutput.from_outputs(self.cfg, outputs)
