"""TensorRT backend: the engines ``deltalm engines DIR`` built from the artifact's ONNX graphs.

Same interface as the ONNX Runtime backend (``cfg``, ``topk``, ``encode``, ``step``). Supported
TensorRT: ``TENSORRT_SUPPORTED`` (10.12 up to 11.x: the versions that build strongly typed
networks). The runtime uses only calls that TensorRT 11 kept (checked against NVIDIA's list of
removed Python APIs, docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/
tensorrt-10x-to-11x-python-api-reference.html): ``Runtime.deserialize_cuda_engine``,
``create_execution_context``, ``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_dtype`` /
``get_tensor_profile_shape``, ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``;
never ``device_memory_size*``, builder flags or calibrators. Device memory comes from Polygraphy's
CUDA wrapper (``polygraphy.cuda``: plain ``cudaMalloc``, never managed memory) and is allocated
ONCE, at construction, for the largest shapes of the engines' optimization profile
(``plan_buffers``, ``device_allocations``): nothing is allocated per batch or per step. GPU 0
only; ``threads`` is accepted for interface parity and ignored.

Where the data lives:
- the encoder writes the cross-attention K/V into device buffers that the decoder step reads
  directly (the step graph selects the live sentences with ``sent_index`` itself);
- the self-attention caches never leave the device: two buffers per cache tensor, used ping-pong
  (the step reads ``past`` from one and writes ``present`` into the other, then they swap); the
  step graph applies the beam reorder (``reorder``) to the past internally, so no gather and no
  host round trip is needed here;
- per step, only tokens / step / reorder / sent_index / the rules go to the device, and only the
  top-k scores and ids ([rows, k]), or the [rows, vocab] log-probs when asked for, come back.

Not implemented: CUDA-graph capture of the step; pinned (page-locked) host buffers for the
per-step copies; several optimization profiles (one profile, index 0, serves every shape); more
than one batch in flight per backend (``encode`` reuses the buffers, so a state from an earlier
``encode`` is refused); bf16 engine I/O (numpy has no bf16).

Importing this module needs neither TensorRT nor CUDA: everything that touches them is imported
inside the functions that use it. The pure functions (profiles, buffer plans, compatibility
checks) are tested without a GPU.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from ..artifact import Artifact, open_artifact
from ..errors import ArtifactError, DeltaLMError, InputError
from ..graphs import GraphSpec, cross_names
from ..graphs import cache_names as past_names  # noqa: F401  (being ported to the new step interface)
from ..graphs import new_kv_names as present_names  # noqa: F401

ENGINE_GRAPHS = ("encoder", "decoder_step")
# The one statement of the supported TensorRT versions: first supported, first unsupported.
# 10.12 is the first with strongly typed networks as the way to build (weak typing deprecated);
# 11.x builds nothing else. 12 is refused until someone has checked its removals.
TENSORRT_SUPPORTED = ((10, 12), (12, 0))
MIN_ALLOCATION = 256  # bytes: never hand TensorRT a null pointer, even for an empty tensor

# TensorRT DataType names -> numpy (bf16 has no numpy dtype: such I/O is refused)
_TRT_TO_NUMPY = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64",
                 "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}


# ---------------------------------------------------------------------------------------------
# pure logic: profiles, buffers, compatibility (no TensorRT, no CUDA)


def profile_axes(spec: GraphSpec, profile: dict) -> dict[str, tuple[int, int, int]]:
    """Per symbolic axis (min, opt, max), read off a per-input profile
    ``{input: (min_shape, opt_shape, max_shape)}`` for the inputs of ``spec``. Every input that
    shares an axis must give it the same bounds (else InputError naming both). ``total_len``
    (an output axis) is ``past_len + 1``."""
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
    if "past_len" in axes:
        lo, opt, hi = axes["past_len"]
        axes["total_len"] = (lo + 1, opt + 1, hi + 1)
    return axes


def _span(bounds) -> str:
    return f"{bounds[0]}/{bounds[1]}/{bounds[2]}"


def plan_buffers(spec: GraphSpec, profile: dict, dtypes: dict[str, str] | None = None) -> dict[str, tuple[tuple, np.dtype, int]]:
    """The device buffer of every input and output of ``spec`` at the profile's maximum:
    ``{name: (max_shape, dtype, nbytes)}``. ``dtypes`` overrides the spec's dtypes (an engine's
    I/O types, e.g. int32 top-k ids). Scalars have shape () and one element."""
    axes = profile_axes(spec, profile)
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
    """Bytes of every device buffer ``TrtBackend`` allocates, keyed ``graph:tensor`` (``cacheS:past_key_i``
    for the two ping-pong slots S of each cache tensor): every encoder input and output (its cross
    K/V outputs are read by the step in place), every other step input and output, and per
    past/present pair two slots sized for the larger of the two. At least MIN_ALLOCATION each."""
    cross = {n for i in range(decoder_layers) for n in cross_names(i)}
    pasts = [n for i in range(decoder_layers) for n in past_names(i)]
    presents = [n for i in range(decoder_layers) for n in present_names(i)]
    alloc = {f"encoder:{n}": max(b, MIN_ALLOCATION) for n, (_, _, b) in encoder_plan.items()}
    for n, (_, _, b) in step_plan.items():
        if n not in cross and n not in pasts and n not in presents:
            alloc[f"decoder_step:{n}"] = max(b, MIN_ALLOCATION)
    for slot in (0, 1):
        for past, present in zip(pasts, presents):
            alloc[f"cache{slot}:{past}"] = max(step_plan[past][2], step_plan[present][2], MIN_ALLOCATION)
    return alloc


_AXIS_HINTS = {
    "rows": ("batch x beam = {v} rows", "--max-batch/--max-beam"),
    "past_rows": ("batch x beam = {v} rows", "--max-batch/--max-beam"),
    "batch": ("a batch of {v} sentences", "--max-batch (or translate with a smaller --batch-size)"),
    "sents": ("a batch of {v} sentences", "--max-batch (or translate with a smaller --batch-size)"),
    "src_len": ("a source of {v} tokens", "--max-src-len"),
    "past_len": ("target length {v}", "--max-tgt-len (or translate with a smaller --max-len-b)"),
    "total_len": ("target length {v}", "--max-tgt-len (or translate with a smaller --max-len-b)"),
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
            raise InputError(f"{what.format(v=value)} exceeds the engine profile maximum {hi}; "
                             f"rebuild engines with {option}")
        if value < lo:
            raise InputError(f"{what.format(v=value)} is below the engine profile minimum {lo}; "
                             f"rebuild engines with a --profile that allows it")


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


def check_engine_compat(meta: dict, onnx_sha256: str, trt_version: str, gpu_name: str,
                        compute_capability: str, where: str = "") -> None:
    """Refuse an engine (metadata written by ``deltalm engines``) that was built from another
    ONNX file, with another TensorRT version, or for another GPU: TensorRT engines load only in
    the version that built them and are tuned for (and may only run on) one GPU model. Raises
    ArtifactError naming every mismatch."""
    name = meta.get("file", meta.get("graph", "engine"))
    problems = []
    if meta.get("onnx_sha256") != onnx_sha256:
        problems.append(f"it was built from another {meta.get('onnx', 'ONNX file')} "
                        f"(sha256 {str(meta.get('onnx_sha256'))[:12]}..., the artifact's is {onnx_sha256[:12]}...)")
    if meta.get("tensorrt") != trt_version:
        problems.append(f"it was built with TensorRT {meta.get('tensorrt')}, this is TensorRT {trt_version}")
    if meta.get("compute_capability") != compute_capability:
        problems.append(f"it was built for compute capability {meta.get('compute_capability')} "
                        f"({meta.get('gpu')}), this GPU ({gpu_name}) has {compute_capability}")
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
        raise DeltaLMError(f"cannot read the TensorRT version {version!r}; deltalm needs TensorRT {supported_tensorrt()}") from None
    lo, hi = TENSORRT_SUPPORTED
    if (major, minor) < lo:
        raise DeltaLMError(f"TensorRT {version} is too old: deltalm needs TensorRT {lo[0]}.{lo[1]} or newer "
                           f"(strongly typed networks); `pip install -U tensorrt`")
    if (major, minor) >= hi:
        raise DeltaLMError(f"TensorRT {version} is not supported yet: deltalm is written for TensorRT {supported_tensorrt()}")


def import_tensorrt():
    """The ``tensorrt`` module, if its version is supported (else DeltaLMError in one line)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise DeltaLMError("TensorRT is not installed (no `tensorrt` Python module); --backend trt and "
                           f"`deltalm engines` need TensorRT {supported_tensorrt()}") from None
    check_tensorrt_version(str(trt.__version__))
    return trt


def _import_cuda():
    try:
        from polygraphy import cuda
    except ImportError:
        raise DeltaLMError("--backend trt needs Polygraphy (the `polygraphy` Python module) for device memory; "
                           "it is not installed") from None
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


@dataclass
class TrtState:
    """One encoded batch. The device buffers belong to the backend; this says how much of them is
    in use. ``slot``: which of the two cache buffers holds the past (the other receives the
    present)."""

    generation: int
    batch: int
    src_len: int
    past_len: int = 0
    past_rows: int = 0
    slot: int = 0


class _Engine:
    """One deserialized engine, its execution context and its device buffers."""

    def __init__(self, runtime, path, spec: GraphSpec):
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
        self.profile = {}  # the engine's own profile 0, not the metadata's copy of it
        for t in spec.inputs:
            if t.name in self.dynamic:
                lo, opt, hi = engine.get_tensor_profile_shape(t.name, 0)
                self.profile[t.name] = (tuple(lo), tuple(opt), tuple(hi))
            else:
                self.profile[t.name] = (tuple(t.shape),) * 3
        self.axes = profile_axes(spec, self.profile)
        self.plan = plan_buffers(spec, self.profile, {n: str(d) for n, d in self.dtypes.items()})
        self.buffers = {}  # name -> DeviceArray, filled by the backend


class TrtBackend:
    """``encode`` / ``step`` over TensorRT engines; see the module docstring for where the data
    lives and what is not implemented."""

    def __init__(self, artifact: Artifact, device: str = "cuda", threads: int | None = None):
        if device != "cuda":
            raise InputError("--backend trt runs on --device cuda only")
        self.artifact = artifact
        self.cfg = artifact.config
        if not self.cfg.is_encoder_decoder:
            raise InputError(f"{artifact.path}: an encoder-only model ({self.cfg.kind}) cannot translate")
        meta = read_engine_metadata(artifact)
        trt = import_tensorrt()
        cuda = _import_cuda()
        gpu_name, capability = gpu_identity()
        for graph in ENGINE_GRAPHS:
            if graph not in meta.get("engines", {}):
                raise ArtifactError(f"{artifact.path}: no {graph} engine; rebuild with `deltalm engines {artifact.path}`")
            check_engine_compat(meta["engines"][graph], graph_source_digest(artifact.manifest, graph),
                                trt.__version__, gpu_name, capability, where=str(artifact.path))
        self.trt = trt
        self.cuda = cuda
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = cuda.Stream()
        self.encoder_spec = artifact.graph_spec("encoder")
        self.step_spec = artifact.graph_spec("decoder_step")
        n = self.cfg.decoder_layers
        self._cross_names = [name for i in range(n) for name in cross_names(i)]
        self._past_names = [name for i in range(n) for name in past_names(i)]
        self._present_names = [name for i in range(n) for name in present_names(i)]
        engine_path = {g: artifact.path / meta["engines"][g]["file"] for g in ENGINE_GRAPHS}
        self.encoder = _Engine(self.runtime, engine_path["encoder"], self.encoder_spec)
        self.step_engine = _Engine(self.runtime, engine_path["decoder_step"], self.step_spec)
        for name in self._cross_names:  # read in place: both engines must agree on the type
            if self.encoder.dtypes[name] != self.step_engine.dtypes[name]:
                raise ArtifactError(f"{artifact.path}: the encoder engine writes {name} as {self.encoder.dtypes[name]}, "
                                    f"the decoder_step engine reads {self.step_engine.dtypes[name]}")
        # allocated once, here: the step's cross K/V inputs are the encoder's output buffers
        engines = {"encoder": self.encoder, "decoder_step": self.step_engine}
        self._memory = {}
        for key, nbytes in device_allocations(self.encoder.plan, self.step_engine.plan, n).items():
            buf = self._memory[key] = cuda.DeviceArray(shape=(nbytes,), dtype=np.uint8)
            graph, name = key.split(":")
            if graph in engines:
                engines[graph].buffers[name] = buf
        self._caches = [[self._memory[f"cache{s}:{p}"] for p in self._past_names] for s in (0, 1)]
        self.topk = int(self.step_spec.outputs[0].shape[-1])
        self.max_target_len = self.step_engine.axes["past_len"][2]
        self._generation = 0

    @classmethod
    def from_artifact(cls, path, device: str = "cuda", threads: int | None = None, **_) -> "TrtBackend":
        return cls(open_artifact(path), device=device, threads=threads)

    def close(self) -> None:
        """Free the device memory (the backend is unusable afterwards)."""
        self.stream.synchronize()
        for buf in self._memory.values():
            buf.free()
        self._memory, self._caches = {}, []
        self.encoder.buffers, self.step_engine.buffers = {}, {}
        self.stream.free()

    # -- device copies ----------------------------------------------------------------------

    def _to_device(self, engine: _Engine, name: str, array) -> np.ndarray:
        host = np.ascontiguousarray(array, dtype=engine.dtypes[name])
        if host.nbytes:
            self.cuda.wrapper().memcpy(engine.buffers[name].ptr, host.ctypes.data, host.nbytes,
                                       self.cuda.MemcpyKind.HostToDevice, self.stream.ptr)
        return host  # the caller keeps it alive until the stream is synchronized

    def _to_host(self, engine: _Engine, name: str, shape: tuple) -> np.ndarray:
        host = np.empty(shape, dtype=engine.dtypes[name])
        if host.nbytes:
            self.cuda.wrapper().memcpy(host.ctypes.data, engine.buffers[name].ptr, host.nbytes,
                                       self.cuda.MemcpyKind.DeviceToHost, self.stream.ptr)
        return host

    def _bind(self, engine: _Engine, name: str, ptr: int, shape: tuple | None = None) -> None:
        if shape is not None and name in engine.dynamic and not engine.context.set_input_shape(name, shape):
            raise InputError(f"TensorRT refused shape {shape} for {name} (outside the engine profile)")
        if not engine.context.set_tensor_address(name, ptr):
            raise ArtifactError(f"TensorRT refused the address of {name}")

    def _run(self, engine: _Engine) -> None:
        if not engine.context.execute_async_v3(self.stream.ptr):
            raise DeltaLMError("TensorRT execution failed (see the TensorRT log above)")

    # -- the backend interface --------------------------------------------------------------

    def encode(self, src_tokens: np.ndarray) -> TrtState:
        """src_tokens [batch, src_len] int64 -> state; the cross K/V stay in device buffers."""
        src = np.ascontiguousarray(src_tokens, dtype=np.int64)
        batch, src_len = src.shape
        check_within_profile(self.encoder.axes, {"batch": batch, "src_len": src_len})
        check_within_profile(self.step_engine.axes, {"batch": batch, "src_len": src_len})
        enc = self.encoder
        keep = [self._to_device(enc, "src_tokens", src)]
        self._bind(enc, "src_tokens", enc.buffers["src_tokens"].ptr, (batch, src_len))
        for name in self.encoder_spec.output_names:
            self._bind(enc, name, enc.buffers[name].ptr)
        self._run(enc)
        keep.append(self._to_device(self.step_engine, "src_padding", src == self.cfg.pad))
        self.stream.synchronize()
        del keep
        self._generation += 1
        return TrtState(generation=self._generation, batch=batch, src_len=src_len)

    def step(self, state: TrtState, tokens, step, reorder, sent_index, rules, want="topk"):
        """One decoder step; returns (scores [rows, k], ids [rows, k] int64) or, with
        want="logprobs", the raw float32 log-probs [rows, vocab]."""
        if state.generation != self._generation:
            raise InputError("this state belongs to an earlier encode(): the TensorRT backend holds one batch at a time")
        cfg = self.cfg
        rows, sents = len(tokens), len(sent_index)
        past_rows = state.past_rows or rows
        check_within_profile(self.step_engine.axes, {"rows": rows, "past_rows": past_rows, "sents": sents,
                                                     "batch": state.batch, "src_len": state.src_len,
                                                     "past_len": state.past_len})
        eng = self.step_engine
        keep = [
            self._to_device(eng, "tokens", tokens),
            self._to_device(eng, "step", np.array(step)),
            self._to_device(eng, "reorder", reorder),
            self._to_device(eng, "sent_index", sent_index),
            self._to_device(eng, "forced_tokens", rules.forced_tokens),
            self._to_device(eng, "ban_eos", np.array(bool(rules.ban_eos))),
            self._to_device(eng, "only_eos", np.array(bool(rules.only_eos))),
            self._to_device(eng, "unk_penalty", np.array(rules.unk_penalty)),
        ]
        for name, shape in (("tokens", (rows,)), ("step", ()), ("reorder", (rows,)), ("sent_index", (sents,)),
                            ("forced_tokens", (rows,)), ("ban_eos", ()), ("only_eos", ()), ("unk_penalty", ())):
            self._bind(eng, name, eng.buffers[name].ptr, shape)
        self._bind(eng, "src_padding", eng.buffers["src_padding"].ptr, (state.batch, state.src_len))
        cross_shape = (state.batch, cfg.heads, state.src_len, cfg.head_dim)
        for name in self._cross_names:
            self._bind(eng, name, self.encoder.buffers[name].ptr, cross_shape)
        past_shape = (past_rows, cfg.heads, state.past_len, cfg.head_dim)
        past_slot, present_slot = self._caches[state.slot], self._caches[1 - state.slot]
        for i, (past, present) in enumerate(zip(self._past_names, self._present_names)):
            self._bind(eng, past, past_slot[i].ptr, past_shape)
            self._bind(eng, present, present_slot[i].ptr)
        for name in ("topk_scores", "topk_ids", "log_probs"):
            self._bind(eng, name, eng.buffers[name].ptr)
        self._run(eng)
        if want == "topk":
            scores = self._to_host(eng, "topk_scores", (rows, self.topk))
            ids = self._to_host(eng, "topk_ids", (rows, self.topk))
        else:
            log_probs = self._to_host(eng, "log_probs", (rows, cfg.vocab_size))
        self.stream.synchronize()
        del keep
        state.past_len += 1
        state.past_rows = rows
        state.slot = 1 - state.slot
        if want == "topk":
            return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)
        return log_probs.astype(np.float32, copy=False)
