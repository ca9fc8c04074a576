"""A stand-in for the ``tensorrt`` Python module, shaped like TensorRT 11.x or like 10.12, and a
stand-in for Polygraphy's CUDA wrapper, so that ``deltalm engines`` (through the real Polygraphy
loaders) and ``--backend trt`` run here without a GPU.

What it is written from (NVIDIA's documentation):
- Removed Python APIs, 10.x -> 11.x:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
  BuilderFlag FP16, INT8, FP8, BF16, INT4, FP4, OBEY_PRECISION_CONSTRAINTS,
  PREFER_PRECISION_CONSTRAINTS, DIRECT_IO; IBuilderConfig int8_calibrator,
  set/get_calibration_profile, set/get/clear_quantization_flag, quantization_flags;
  ICudaEngine device_memory_size and device_memory_size_for_profile (replaced by their _v2).
- Removed C++ APIs, 10.x -> 11.x (IBuilder::platformHasFastFp16 / platformHasFastInt8, whose
  Python names are Builder.platform_has_fast_fp16 / platform_has_fast_int8):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-c-api-reference.html
- NetworkDefinitionCreationFlag.STRONGLY_TYPED (NvInfer.h, kSTRONGLY_TYPED): "Setting layer
  precision and layer output types is not allowed"; deprecated in 11.0, where every network is
  strongly typed and the flag is accepted and ignored. In 10.12 weak typing still works but is
  deprecated (the migration guide, tensorrt-10x-to-11x.html, "Strongly Typed Networks Are Now
  Required").
- The Python API reference for the classes used (Builder, INetworkDefinition, ILayer, ITensor,
  IBuilderConfig, IOptimizationProfile, ITimingCache, OnnxParser, Runtime, ICudaEngine,
  IExecutionContext, ILogger): https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/index.html

What it does instead of TensorRT: the parser reads the ONNX graph's inputs, outputs and nodes (one
"layer" per node); the builder checks the optimization profile against the inputs and serializes
an "engine" that names its ONNX file, its profile, its flags and whether the network was strongly
typed; the runtime's engine executes that ONNX graph with ONNX Runtime (CPU) on the tensors found
at the bound addresses with the shapes set. Like TensorRT, it reads execution tensors from device
memory and shape-calculation inputs (``is_shape_inference_io``) from host memory, and refuses an
address on the wrong side (the stand-in device memory, ``FakeCuda``, keeps a registry of its
allocations); an output whose shape no input shape gives (an ONNX dimension name that no input
has, like ``vocab`` of ``log_probs``) counts as data-dependent and needs an ``IOutputAllocator``
(Python API reference, IExecutionContext / IOutputAllocator). ``trt.shape_tensor_inputs``: the
inputs the stand-in's parser marks as shape tensors (none by default), to exercise that path;
they need value ranges in the profile (``set_shape_input``). Touching a removed (11.x) or deprecated weak-typing
(10.12) name, or setting a layer's precision / output type, is recorded with the module that did
it (``trt.touched``) and raises like the real thing would.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
import weakref
from pathlib import Path

import numpy as np

# What 11.x removed (and 10.12 still has, deprecated), per class; see the module docstring.
WEAK_TYPING_FLAGS = (
    "FP16",
    "INT8",
    "FP8",
    "BF16",
    "INT4",
    "FP4",
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
    "DIRECT_IO",
)
REMOVED_IN_11 = {
    "BuilderFlag": WEAK_TYPING_FLAGS,
    "IBuilderConfig": (
        "int8_calibrator",
        "set_calibration_profile",
        "get_calibration_profile",
        "set_quantization_flag",
        "get_quantization_flag",
        "clear_quantization_flag",
        "quantization_flags",
    ),
    "ICudaEngine": ("device_memory_size", "device_memory_size_for_profile"),
    "Builder": ("platform_has_fast_fp16", "platform_has_fast_int8"),
}
KEPT_FLAGS = (
    "TF32",
    "REFIT",
    "SPARSE_WEIGHTS",
    "SAFETY_SCOPE",
    "STRIP_PLAN",
    "VERSION_COMPATIBLE",
    "EXCLUDE_LEAN_RUNTIME",
    "GPU_FALLBACK",
    "DISABLE_TIMING_CACHE",
    "WEIGHT_STREAMING",
    "ERROR_ON_TIMING_CACHE_MISS",
    "DISABLE_COMPILATION_CACHE",
)

_ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16", 7: "INT64", 6: "INT32", 9: "BOOL", 3: "INT8", 2: "UINT8"}
_ORT_TO_TRT = {
    "tensor(float)": "FLOAT",
    "tensor(float16)": "HALF",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(bool)": "BOOL",
}
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}
_LAYER_TYPES = {
    "LayerNormalization": "NORMALIZATION",
    "Softmax": "SOFTMAX",
    "LogSoftmax": "SOFTMAX",
    "MatMul": "MATRIX_MULTIPLY",
    "TopK": "TOPK",
    "Gather": "GATHER",
    "Cast": "CAST",
    "Shape": "SHAPE",
    "Reshape": "SHUFFLE",
    "Transpose": "SHUFFLE",
    "ReduceMean": "REDUCE",
    "Constant": "CONSTANT",
}


class StandInError(RuntimeError):
    """What the stand-in raises where real TensorRT reports an API error."""


def _caller_module() -> str:
    """Name of the first module up the stack that is not this one."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    return frame.f_globals.get("__name__", "?") if frame is not None else "?"


def make_tensorrt(version: str = "11.4.0.106") -> types.ModuleType:
    """A fresh stand-in ``tensorrt`` module of ``version`` (11.x: weak typing absent, every network
    strongly typed; 10.x: weak typing present but recorded when touched, STRONGLY_TYPED opt-in)."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__file__ = __file__
    trt.__version__ = version
    trt.touched = []  # (what, module): removed / deprecated names touched, layer precisions set
    trt.shape_tensor_inputs = set()  # inputs the parser marks as shape tensors

    def touch(what: str) -> None:
        trt.touched.append((what, _caller_module()))

    removed = {cls: set(names) for cls, names in REMOVED_IN_11.items()} if major >= 11 else {}

    class _Meta(enum.EnumMeta):
        def __getattr__(cls, name):
            if not name.startswith("_") and name in removed.get(cls.__name__, ()):
                touch(f"{cls.__name__}.{name}")
            raise AttributeError(f"type object '{cls.__name__}' has no attribute '{name}'")

    class _RecordedEnum(enum.IntEnum, metaclass=_Meta):
        """Base of the enums whose removed members are recorded when touched."""

    class _Recorded:
        """Classes whose removed attributes are recorded when touched (11.x) and whose
        deprecated weak-typing attributes are recorded when used (10.x)."""

        def __getattr__(self, name):
            if name in removed.get(type(self).__name__, ()):
                touch(f"{type(self).__name__}.{name}")
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    flag_names = KEPT_FLAGS + (() if major >= 11 else WEAK_TYPING_FLAGS)
    trt.BuilderFlag = _RecordedEnum("BuilderFlag", [(n, i) for i, n in enumerate(flag_names)])
    creation_flags = ["STRONGLY_TYPED"] if major >= 11 else ["EXPLICIT_BATCH", "STRONGLY_TYPED"]
    trt.NetworkDefinitionCreationFlag = _RecordedEnum(
        "NetworkDefinitionCreationFlag", [(n, i) for i, n in enumerate(creation_flags)]
    )
    trt.DataType = enum.IntEnum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64"])
    trt.float32, trt.float16, trt.bfloat16 = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16
    trt.LayerType = enum.IntEnum(
        "LayerType", sorted(set(_LAYER_TYPES.values()) | {"ELEMENTWISE", "QUANTIZE", "DEQUANTIZE"})
    )
    trt.OnnxParserFlag = enum.IntEnum("OnnxParserFlag", ["NATIVE_INSTANCENORM"], start=0)
    trt.DeviceType = enum.IntEnum("DeviceType", ["GPU", "DLA"], start=0)
    trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "NONE", "DETAILED"], start=0)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE"], start=0)
    if major < 11:
        trt.QuantizationFlag = enum.IntEnum("QuantizationFlag", ["CALIBRATE_BEFORE_FUSION"], start=0)

    class ILogger:
        def __init__(self):
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity=WARNING):
            super().__init__()

    trt.ILogger, trt.Logger = ILogger, Logger
    trt.init_libnvinfer_plugins = lambda logger, namespace: True

    class ITensor:
        def __init__(self, name, dtype, shape):
            self.name, self.dtype, self.shape = name, dtype, tuple(shape)
            self.is_shape_tensor = False

    class ILayer:
        def __init__(self, network, name, type_):
            self._network, self.name, self.type = network, name, type_
            self.precision_is_set = False

        @property
        def precision(self):
            return trt.DataType.FLOAT

        @precision.setter
        def precision(self, value):
            touch("ILayer.precision")
            if self._network.strongly_typed:
                raise StandInError("setting a layer precision is not allowed in a strongly typed network")
            self.precision_is_set = True

        def set_output_type(self, index, dtype):
            touch("ILayer.set_output_type")
            if self._network.strongly_typed:
                raise StandInError("setting a layer output type is not allowed in a strongly typed network")

    class INetworkDefinition:
        def __init__(self, flags):
            self.flags = flags
            strongly = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            self.strongly_typed = major >= 11 or bool(flags & strongly)
            self.inputs, self.outputs, self.layers = [], [], []
            self.onnx_path = None

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))
        num_layers = property(lambda self: len(self.layers))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

        def get_layer(self, i):
            return self.layers[i]

        def __len__(self):
            return len(self.layers)

        def __getitem__(self, i):
            return self.layers[i]

        def get_flag(self, flag):
            if flag == trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED:
                return self.strongly_typed
            return bool(self.flags & (1 << int(flag)))

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors, self.flags = network, [], 0

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

        def clear_flag(self, flag):
            self.flags &= ~(1 << int(flag))

        def set_flag(self, flag):
            self.flags |= 1 << int(flag)

        def parse_from_file(self, path):
            import onnx

            try:
                model = onnx.load(str(path), load_external_data=False)
            except Exception as e:  # noqa: BLE001 - the parser reports, it does not raise
                self.errors.append(f"cannot read {path}: {e}")
                return False
            net = self.network
            net.onnx_path = str(Path(path).resolve())
            init = {i.name for i in model.graph.initializer}

            def tensor(v):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                return ITensor(v.name, trt.DataType[_ONNX_TO_TRT[v.type.tensor_type.elem_type]], dims)

            net.inputs = [tensor(v) for v in model.graph.input if v.name not in init]
            for t in net.inputs:
                t.is_shape_tensor = t.name in trt.shape_tensor_inputs
            input_dims = {d.dim_param for v in model.graph.input for d in v.type.tensor_type.shape.dim}
            net.output_only_dims = {
                v.name: sorted(
                    {d.dim_param for d in v.type.tensor_type.shape.dim if d.dim_param and d.dim_param not in input_dims}
                )
                for v in model.graph.output
            }
            net.outputs = [tensor(v) for v in model.graph.output]
            for node in model.graph.node:
                kind = _LAYER_TYPES.get(node.op_type, "ELEMENTWISE")
                net.layers.append(ILayer(net, node.name or node.op_type, trt.LayerType[kind]))
            return True

    trt.ITensor, trt.ILayer, trt.INetworkDefinition, trt.OnnxParser = ITensor, ILayer, INetworkDefinition, OnnxParser

    class IOptimizationProfile:
        def __init__(self):
            self.shapes, self.values = {}, {}

        def set_shape_input(self, name, min, opt, max):
            self.values[name] = tuple(tuple(int(v) for v in s) for s in (min, opt, max))

        def set_shape(self, name, min, opt, max):
            lo, op, hi = (tuple(int(d) for d in s) for s in (min, opt, max))
            if not (len(lo) == len(op) == len(hi)) or not all(a <= b <= c for a, b, c in zip(lo, op, hi)):
                raise StandInError(f"profile of {name}: needs min <= opt <= max of one rank, got {lo} / {op} / {hi}")
            self.shapes[name] = (lo, op, hi)

        def get_shape(self, name):
            return self.shapes[name]

        def __bool__(self):
            return True

    class HostMemory(bytes):
        """IHostMemory: a buffer that is also a context manager."""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class ITimingCache:
        def __init__(self, data: bytes):
            self.entries = set(json.loads(data)["entries"]) if data else set()

        def combine(self, other, ignore_mismatch):
            self.entries |= other.entries
            return True

        def serialize(self):
            return HostMemory(json.dumps({"tensorrt": version, "entries": sorted(self.entries)}).encode())

    class IBuilderConfig(_Recorded):
        def __init__(self):
            self.flag_set = {trt.BuilderFlag.TF32}  # TF32 is on by default
            self.profiles, self.timing_cache = [], None
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
            self.DLA_core, self.default_device_type = -1, trt.DeviceType.GPU

        num_optimization_profiles = property(lambda self: len(self.profiles))

        def set_flag(self, flag):
            if flag.name in WEAK_TYPING_FLAGS:
                touch(f"BuilderFlag.{flag.name}")
            self.flag_set.add(flag)

        def clear_flag(self, flag):
            self.flag_set.discard(flag)

        def get_flag(self, flag):
            return flag in self.flag_set

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return ITimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing_cache = cache
            return True

        def get_timing_cache(self):
            return self.timing_cache

        def get_memory_pool_limit(self, pool):
            return 1 << 30

    class Builder(_Recorded):
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            if not config.profiles:
                raise StandInError("no optimization profile")
            profile = config.profiles[0]
            for t in network.inputs:
                if t.is_shape_tensor:
                    if t.name not in profile.values:
                        raise StandInError(f"shape tensor input {t.name} has no value range in the profile")
                    continue
                if t.name not in profile.shapes:
                    if -1 in t.shape:
                        raise StandInError(f"input {t.name} has dynamic dims and no profile")
                    continue
                for lo, hi, d in zip(profile.shapes[t.name][0], profile.shapes[t.name][2], t.shape):
                    if d != -1 and not lo == hi == d:
                        raise StandInError(f"profile of {t.name} changes a static dim {d}")
            key = f"{Path(network.onnx_path).name}:{json.dumps(profile.shapes, sort_keys=True)}"
            hit = config.timing_cache is not None and key in config.timing_cache.entries
            if config.timing_cache is not None:
                config.timing_cache.entries.add(key)
            plan = {
                "onnx": network.onnx_path,
                "tensorrt": version,
                "strongly_typed": network.strongly_typed,
                "builder_flags": sorted(f.name for f in config.flag_set),
                "timing_cache_hit": hit,
                "layers": len(network.layers),
                "shape_inputs": sorted(profile.values),
                # with a shape input, TensorRT may compute output shapes from its value
                "data_dependent": []
                if profile.values
                else sorted(n for n, dims in network.output_only_dims.items() if dims),
                "profile": {
                    n: {"min": list(lo), "opt": list(op), "max": list(hi)} for n, (lo, op, hi) in profile.shapes.items()
                },
            }
            return HostMemory(json.dumps(plan).encode())

    trt.IOptimizationProfile, trt.ITimingCache, trt.IBuilderConfig, trt.Builder = (
        IOptimizationProfile,
        ITimingCache,
        IBuilderConfig,
        Builder,
    )
    if major < 11:
        Builder.platform_has_fast_fp16 = property(lambda self: touch("Builder.platform_has_fast_fp16") or True)

    class IOutputAllocator:
        """Application-implemented: TensorRT asks it for an output's memory and tells it the shape."""

        def __init__(self):
            pass

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

    class IExecutionContext:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.allocators = engine, {}, {}, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profile[name]
            if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def set_output_allocator(self, name, allocator):
            if not isinstance(allocator, IOutputAllocator):
                raise TypeError("set_output_allocator needs an IOutputAllocator")
            self.allocators[name] = allocator
            return True

        def _address(self, name, nbytes, host: bool) -> int:
            if name not in self.addresses:
                raise StandInError(f"no address set for {name}")
            ptr = self.addresses[name]
            if host and on_device(ptr, nbytes):
                raise StandInError(f"{name} is a shape-calculation input: TensorRT reads it from host memory")
            if not host and not on_device(ptr, nbytes):
                raise StandInError(f"{name} is bound to {nbytes} bytes outside device memory")
            return ptr

        def execute_async_v3(self, stream_handle):
            feeds = {}
            for i in self.engine.session.get_inputs():
                shape = self.shapes.get(i.name, tuple(i.shape))  # static (scalar) inputs need no shape
                dtype = _NUMPY[self.engine.types[i.name]]
                nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                host = i.name in self.engine.plan["shape_inputs"]
                feeds[i.name] = read_device(self._address(i.name, nbytes, host), shape, dtype)
            names = [o.name for o in self.engine.session.get_outputs()]
            for name, value in zip(names, self.engine.session.run(names, feeds)):
                value = np.ascontiguousarray(value)
                if name in self.allocators:
                    allocator = self.allocators[name]
                    ptr = allocator.reallocate_output_async(
                        name, self.addresses.get(name, 0), value.nbytes, 256, stream_handle
                    )
                    if not ptr or not on_device(ptr, value.nbytes):
                        return False  # TensorRT: the allocation failed
                    allocator.notify_shape(name, value.shape)
                elif name in self.engine.plan["data_dependent"]:
                    raise StandInError(f"output {name} has a data-dependent shape: it needs an IOutputAllocator")
                else:
                    ptr = self._address(name, value.nbytes, host=False)
                ctypes.memmove(ptr, value.ctypes.data, value.nbytes)
            return True

    class ICudaEngine(_Recorded):
        def __init__(self, plan: dict):
            import onnxruntime as ort

            self.plan = plan
            self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
            tensors = self.session.get_inputs() + self.session.get_outputs()
            self.names = [t.name for t in tensors]
            self.types = {t.name: _ORT_TO_TRT[t.type] for t in tensors}
            self.profile = {n: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for n, v in plan["profile"].items()}

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_dtype(self, name):
            return trt.DataType[self.types[name]]

        def get_tensor_profile_shape(self, name, profile_index):
            return self.profile[name]

        def is_shape_inference_io(self, name):
            return name in self.plan["shape_inputs"]

        def create_execution_context(self):
            return IExecutionContext(self)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            plan = json.loads(bytes(data))
            if plan["tensorrt"] != version:  # engines load only in the version that built them
                return None
            return ICudaEngine(plan)

    trt.IOutputAllocator, trt.IExecutionContext, trt.ICudaEngine, trt.Runtime = (
        IOutputAllocator,
        IExecutionContext,
        ICudaEngine,
        Runtime,
    )
    return trt


def read_device(ptr: int, shape, dtype) -> np.ndarray:
    """A copy of the array at stand-in "device" address ``ptr``."""
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.empty(shape, dtype)
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))
    return raw.view(dtype).reshape(shape).copy()


_DEVICE: dict[int, int] = {}  # stand-in device memory: address -> bytes, of every live FakeDeviceArray


def on_device(ptr: int, nbytes: int) -> bool:
    """Whether [ptr, ptr + nbytes) lies inside one live stand-in device allocation."""
    return any(start <= ptr and ptr + nbytes <= start + size for start, size in _DEVICE.items())


class FakeDeviceArray:
    def __init__(self, shape, dtype):
        self.host = np.zeros(shape, dtype)
        self.ptr = self.host.ctypes.data
        self.nbytes = self.host.nbytes
        _DEVICE[self.ptr] = self.nbytes
        # a backend dropped without close(): its memory leaves the registry with it
        self._unregister = weakref.finalize(self, _DEVICE.pop, self.ptr, None)
        FakeCuda.allocations += 1

    def free(self):
        self._unregister()  # runs once: a later array at the same address stays registered
        self.host, self.ptr = None, 0


class FakeCuda:
    """``polygraphy.cuda`` as TrtBackend uses it: "device memory" is host memory with real
    addresses and memcpy is memmove. ``copies`` records (kind, nbytes) of every copy,
    ``allocations`` counts the device arrays made."""

    DeviceArray = FakeDeviceArray
    MemcpyKind = types.SimpleNamespace(HostToDevice=1, DeviceToHost=2)
    copies: list = []
    allocations = 0

    class Stream:
        ptr = 0

        def synchronize(self):
            pass

        def free(self):
            pass

    @classmethod
    def wrapper(cls):
        def memcpy(dst, src, nbytes, kind, stream_ptr=None):
            device, host = (dst, src) if kind == cls.MemcpyKind.HostToDevice else (src, dst)
            if not on_device(device, nbytes) or on_device(host, nbytes):
                raise StandInError(
                    f"memcpy of {nbytes} bytes: the device side is not in device memory or the host side is"
                )
            cls.copies.append((kind, nbytes))
            ctypes.memmove(dst, src, nbytes)

        return types.SimpleNamespace(memcpy=memcpy)


def reset_polygraphy_tensorrt() -> None:
    """Make Polygraphy import ``tensorrt`` again on next use: its lazy modules keep the module
    they imported first, and its TensorRT logger subclasses that module's ILogger."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("polygraphy") or not isinstance(module, types.ModuleType):
            continue
        for value in list(vars(module).values()):
            if type(value).__name__ == "LazyModule" and getattr(value, "module", None) is not None:
                if getattr(value.module, "__name__", "") == "tensorrt":
                    object.__setattr__(value, "module", None)
    util = sys.modules.get("polygraphy.backend.trt.util")
    if util is not None:
        util.TRT_LOGGER = None
