"""``deltalm engines DIR``: TensorRT engines for an artifact's encoder and decoder_step graphs.

The plan (optimization profiles, equivalent ``trtexec`` command lines) is pure logic and prints
without TensorRT (``--print-only``). Building needs TensorRT 10 and a GPU; it writes
``DIR/engines/{encoder,decoder_step}.plan`` and ``engines.json`` (what each engine was built
from and for) into a hidden sibling directory that replaces ``DIR/engines`` in one rename, keeps
a persistent timing cache there (``timing.cache``: later builds of the same shapes are much
faster), and records the engines in ``manifest.json`` (``manifest["engines"]`` and the files'
sha256) through a temp file + rename.

Profiles come from the symbolic axes of ``runtime/graphs.py``: ``batch`` (sentences given to the
encoder), ``src_len``, ``rows`` = sentences x beam, ``past_rows`` (rows of the previous step),
``sents`` (live sentences), ``past_len`` (0 on the first step). In fp16 / bf16 engines the
normalization and softmax layers are kept in fp32 (layer precision and output type, with
precision constraints obeyed): the log-softmax over 250k logits and LayerNorm's variance are where
half precision loses the top-k.

Not implemented: INT8 / FP8 engines (an int8 artifact holds ONNX Runtime's dynamic quantization,
which TensorRT does not parse), several optimization profiles per engine, TensorRT 11's strongly
typed networks.
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from deltalm.artifact import hash_files, open_artifact, read_manifest
from deltalm.manifest import Engines
from deltalm.atomic import atomic_directory, write_json_atomic
from deltalm.backends.trt import (
    ENGINE_GRAPHS,
    check_engine_compat,
    device_allocations,
    gpu_identity,
    graph_source_digest,
    import_tensorrt,
    plan_buffers,
    profile_axes,
    profile_to_json,
)
from deltalm.config import ModelConfig
from deltalm.errors import DeltaLMError, ExportError, InputError
from deltalm.graphs import GraphSpec, decoder_step_spec, encoder_spec

ENGINES_DIR = "engines"
METADATA = "engines.json"
TIMING_CACHE = "timing.cache"
PRECISIONS = ("fp32", "fp16", "bf16")
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX")
# layers of a LayerNorm / (log-)softmax that the parser decomposed, recognized by their ONNX node name
FP32_DECOMPOSED_TYPES = ("REDUCE", "ELEMENTWISE", "UNARY")
FP32_NAME_MARKS = ("LayerNormalization", "Softmax")  # "Softmax" also matches "LogSoftmax"
FP32_ONNX_OPS = ("LayerNormalization", "Softmax", "LogSoftmax")

__all__ = ["derive_profiles", "load_profile_override", "apply_profile_override", "trtexec_command", "build_engine",
           "engine_metadata", "check_engine_compat", "engines_command", "fp32_layer", "axis_bounds"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# profiles


def _specs_of(manifest_or_cfg) -> tuple[ModelConfig, dict[str, GraphSpec]]:
    """(config, {graph: spec}) of a manifest dict, an Artifact or a ModelConfig."""
    manifest = getattr(manifest_or_cfg, "manifest", manifest_or_cfg)
    if isinstance(manifest, ModelConfig):
        specs = {"encoder": encoder_spec(manifest)}
        if manifest.is_encoder_decoder:
            specs["decoder_step"] = decoder_step_spec(manifest)
        return manifest, specs
    cfg = manifest.model
    specs = {g: manifest.graphs[g].spec for g in ENGINE_GRAPHS if g in manifest.graphs}
    return cfg, specs


def axis_bounds(max_batch: int, max_beam: int, max_src_len: int, max_tgt_len: int,
                max_positions: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic axis. opt: half the batch at full beam, a quarter of the
    longest source and target: the shapes TensorRT tunes its kernels for."""
    for flag, value in (("--max-batch", max_batch), ("--max-beam", max_beam), ("--max-src-len", max_src_len),
                        ("--max-tgt-len", max_tgt_len)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{flag} must be an integer >= 1, got {value!r}")
    if max_src_len > max_positions:
        raise InputError(f"--max-src-len {max_src_len} exceeds the model's max_positions {max_positions}")
    if max_tgt_len >= max_positions:
        raise InputError(f"--max-tgt-len {max_tgt_len} must be < the model's max_positions {max_positions} "
                         f"(the decoder step's past_len reaches at most max_positions - 1)")
    opt_batch = max(1, max_batch // 2)
    rows = (1, opt_batch * max_beam, max_batch * max_beam)
    return {
        "batch": (1, opt_batch, max_batch),
        "sents": (1, opt_batch, max_batch),
        "rows": rows,
        "past_rows": rows,
        "src_len": (1, max(1, max_src_len // 4), max_src_len),
        "past_len": (0, max(1, max_tgt_len // 4), max_tgt_len),
    }


def shapes_from_axes(spec: GraphSpec, axes: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Per input of ``spec``: (min_shape, opt_shape, max_shape); scalars get ((), (), ())."""
    profile = {}
    for t in spec.inputs:
        dims = []
        for d in t.shape:
            if isinstance(d, str):
                if d not in axes:
                    raise InputError(f"{spec.name}.{t.name}: no bounds for axis {d!r}")
                dims.append(axes[d])
            else:
                dims.append((int(d),) * 3)
        profile[t.name] = tuple(tuple(b[i] for b in dims) for i in range(3))
    return profile


def derive_profiles(manifest_or_cfg, max_batch: int, max_beam: int, max_src_len: int,
                    max_tgt_len: int) -> dict[str, dict[str, tuple[tuple, tuple, tuple]]]:
    """{graph: {input: (min, opt, max)}} for the artifact's engine graphs (a manifest dict, an
    Artifact, or a ModelConfig whose default specs are used). InputError on nonsense limits."""
    cfg, specs = _specs_of(manifest_or_cfg)
    axes = axis_bounds(max_batch, max_beam, max_src_len, max_tgt_len, cfg.max_positions)
    return {g: shapes_from_axes(spec, axes) for g, spec in specs.items()}


def load_profile_override(path: str | Path) -> dict:
    """The ``--profile`` JSON file: ``{graph: {input: {"min": [..], "opt": [..], "max": [..]}}}``
    (any subset of graphs and inputs)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: no such profile file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not a JSON profile ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: a profile is a JSON object {{graph: {{input: {{min, opt, max}}}}}}")
    return data


def apply_profile_override(profiles: dict, override: dict, manifest_or_cfg) -> dict:
    """``profiles`` with the entries of ``override`` replaced, validated: graph and input names
    exist, each of min/opt/max is a list of ints of the input's rank with its fixed dims,
    min <= opt <= max, inputs sharing an axis agree, and the limits of the model hold."""
    cfg, specs = _specs_of(manifest_or_cfg)
    merged = {g: dict(p) for g, p in profiles.items()}
    for graph, entries in override.items():
        if graph not in specs:
            raise InputError(f"profile: unknown graph {graph!r} (graphs: {', '.join(specs)})")
        if not isinstance(entries, dict):
            raise InputError(f"profile: {graph} must map input names to {{min, opt, max}}")
        spec = specs[graph]
        by_name = {t.name: t for t in spec.inputs}
        for name, entry in entries.items():
            if name not in by_name:
                raise InputError(f"profile: {graph} has no input {name!r} (inputs: {', '.join(by_name)})")
            t = by_name[name]
            if not isinstance(entry, dict) or set(entry) != {"min", "opt", "max"}:
                raise InputError(f"profile: {graph}.{name} must be {{\"min\": [...], \"opt\": [...], \"max\": [...]}}")
            shapes = []
            for key in ("min", "opt", "max"):
                shape = entry[key]
                if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                    raise InputError(f"profile: {graph}.{name} {key} must be a list of integers, got {shape!r}")
                if len(shape) != len(t.shape):
                    raise InputError(f"profile: {graph}.{name} {key} has rank {len(shape)}, the input has rank {len(t.shape)} {list(t.shape)}")
                for i, (d, want) in enumerate(zip(shape, t.shape)):
                    if not isinstance(want, str) and d != want:
                        raise InputError(f"profile: {graph}.{name} {key} dim {i} must be {want}, got {d}")
                    if d < (0 if want == "past_len" else 1):
                        raise InputError(f"profile: {graph}.{name} {key} dim {i} ({want}) must be >= {0 if want == 'past_len' else 1}, got {d}")
                shapes.append(tuple(shape))
            lo, opt, hi = shapes
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise InputError(f"profile: {graph}.{name} needs min <= opt <= max in every dim, got {list(lo)} / {list(opt)} / {list(hi)}")
            merged[graph][name] = (lo, opt, hi)
    validate_profiles(merged, specs, cfg)
    return merged


def validate_profiles(profiles: dict, specs: dict[str, GraphSpec], cfg: ModelConfig) -> None:
    """Shared axes agree within each graph, the encoder and the step agree on batch and src_len,
    and the model's position limits hold."""
    axes = {g: profile_axes(specs[g], profiles[g]) for g in profiles}
    if "encoder" in axes and "decoder_step" in axes:
        for axis in ("batch", "src_len"):
            a, b = axes["encoder"].get(axis), axes["decoder_step"].get(axis)
            if a and b and a[2] > b[2]:
                raise InputError(f"profile: encoder allows {axis} up to {a[2]} but decoder_step only up to {b[2]}")
    for g, ax in axes.items():
        if "src_len" in ax and ax["src_len"][2] > cfg.max_positions:
            raise InputError(f"profile: {g} src_len max {ax['src_len'][2]} exceeds the model's max_positions {cfg.max_positions}")
        if "past_len" in ax and ax["past_len"][2] >= cfg.max_positions:
            raise InputError(f"profile: {g} past_len max {ax['past_len'][2]} must be < the model's max_positions {cfg.max_positions}")


# ---------------------------------------------------------------------------------------------
# precision


def check_precision(artifact_precision: str, precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if artifact_precision == "int8":
        raise InputError("an int8 artifact holds ONNX Runtime's dynamic quantization, which TensorRT cannot parse; "
                         "build engines from an fp32 export (deltalm export --precision fp32)")
    if artifact_precision == "fp16" and precision == "bf16":
        raise InputError("bf16 engines need an fp32 artifact (this one's graphs are float16)")


def fp32_layer(type_name: str, layer_name: str) -> bool:
    """Whether a TensorRT layer stays fp32 in an fp16 / bf16 engine: every normalization and
    softmax layer, and the layers the ONNX parser made of a LayerNormalization / (Log)Softmax
    node when it decomposed one (they carry the node's name)."""
    if type_name in FP32_LAYER_TYPES:
        return True
    return type_name in FP32_DECOMPOSED_TYPES and any(mark in layer_name for mark in FP32_NAME_MARKS)


def onnx_fp32_nodes(onnx_path: Path) -> list[str]:
    """Names of the ONNX nodes that should stay fp32 (for trtexec's --layerPrecisions: the parser
    names a node's layer after the node; the Python build selects by layer type instead)."""
    try:
        import onnx
    except ImportError:
        return []
    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in FP32_ONNX_OPS and n.name]


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(onnx_path, engine_path, profile: dict, precision: str, timing_cache,
                    fp32_layers: list[str] | tuple = ()) -> str:
    """The trtexec command line that builds the same engine (for users with trtexec but not the
    Python bindings). Scalar inputs need no shapes."""
    shaped = [(name, b) for name, b in profile.items() if len(b[0])]
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    for flag, i in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        if shaped:
            args.append(f"{flag}=" + ",".join(f"{name}:{_dims(b[i])}" for name, b in shaped))
    if precision in ("fp16", "bf16"):
        args.append(f"--{precision}")
        if fp32_layers:
            spec = ",".join(f"{name}:fp32" for name in fp32_layers)
            args += ["--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(a) for a in args)


# ---------------------------------------------------------------------------------------------
# the TensorRT build (needs TensorRT and a GPU)


def _keep_fp32(trt, network) -> int:
    """Pin the fp32 layers (``fp32_layer``) of a parsed network; returns how many."""
    floats = {trt.float32, trt.float16}
    if hasattr(trt, "bfloat16"):
        floats.add(trt.bfloat16)
    kept = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not fp32_layer(layer.type.name, layer.name):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in floats:
                layer.set_output_type(j, trt.float32)
        kept += 1
    return kept


def build_engine(onnx_path, engine_path, profile: dict, precision: str, timing_cache_path) -> dict:
    """Parse ``onnx_path``, build one engine with one optimization profile ``{input: (min, opt,
    max)}`` in ``precision`` (fp32 / fp16 / bf16; normalization and softmax stay fp32), write it to
    ``engine_path``; the timing cache at ``timing_cache_path`` is read if present and written
    back. Returns {"build_seconds", "fp32_layers", "layers"}. TensorRT 10 API."""
    trt = import_tensorrt()
    onnx_path, engine_path, timing_cache_path = Path(onnx_path), Path(engine_path), Path(timing_cache_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser failed: " + " | ".join(errors[:5]))
    config = builder.create_builder_config()
    kept = 0
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if precision != "fp32":
        kept = _keep_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        if len(lo):
            opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache_path.read_bytes() if timing_cache_path.exists() else b"")
    config.set_timing_cache(cache, True)  # a cache from another GPU / version is ignored, not fatal
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)")
    with open(engine_path, "wb") as f:
        f.write(serialized)
    with open(timing_cache_path, "wb") as f:
        f.write(config.get_timing_cache().serialize())
    return {"build_seconds": round(seconds, 2), "fp32_layers": kept, "layers": network.num_layers}


def engine_metadata(graph: str, engine_file: str, onnx_file: str, onnx_sha256: str, precision: str, profile: dict,
                    trt_version: str, gpu_name: str, compute_capability: str, build: dict | None = None) -> dict:
    """What one engine was built from and for (checked by ``check_engine_compat`` on load)."""
    return {
        "graph": graph,
        "file": engine_file,
        "onnx": onnx_file,
        "onnx_sha256": onnx_sha256,
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "compute_capability": compute_capability,
        "precision": precision,
        "profile": profile_to_json(profile),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(build or {}),
    }


# ---------------------------------------------------------------------------------------------
# the command


def format_plan(path: Path, precision: str, profiles: dict, specs: dict[str, GraphSpec], decoder_layers: int) -> str:
    """What will be built: per graph the axis bounds and each input's min/opt/max shapes, and the
    device memory ``--backend trt`` allocates for these profiles."""
    kept = "; normalization and softmax in fp32" if precision != "fp32" else ""
    lines = [f"TensorRT engines for {path} ({precision}{kept})"]
    plans = {}
    for graph, profile in profiles.items():
        axes = profile_axes(specs[graph], profile)
        lines.append(f"{graph}: " + ", ".join(f"{a} {lo}/{opt}/{hi}" for a, (lo, opt, hi) in axes.items())
                     + "  (min/opt/max)")
        width = max(len(n) for n in profile)
        for name, (lo, opt, hi) in profile.items():
            if len(lo):
                lines.append(f"  {name:<{width}}  min {list(lo)}  opt {list(opt)}  max {list(hi)}")
        plans[graph] = plan_buffers(specs[graph], profile)
    if "decoder_step" in plans:
        total = sum(device_allocations(plans["encoder"], plans["decoder_step"], decoder_layers).values())
        lines.append(f"device buffers of --backend trt for these profiles (allocated once): {total / 2**20:.1f} MiB")
    return "\n".join(lines)


def _forget_engines(manifest) -> None:
    manifest.engines = None
    manifest.files = {n: d for n, d in manifest.files.items() if not n.startswith(ENGINES_DIR + "/")}


def engines_command(args) -> int:
    artifact = open_artifact(args.dir)
    cfg = artifact.config
    precision = getattr(args, "precision", "fp16")
    check_precision(artifact.precision, precision)
    graphs = [g for g in ENGINE_GRAPHS if artifact.has_graph(g)]
    specs = {g: artifact.graph_spec(g) for g in graphs}
    profiles = derive_profiles(artifact.manifest, args.max_batch, args.max_beam, args.max_src_len, args.max_tgt_len)
    if getattr(args, "profile", None):
        profiles = apply_profile_override(profiles, load_profile_override(args.profile), artifact.manifest)
    engines_dir = artifact.path / ENGINES_DIR
    commands = []
    for g in graphs:
        fp32_nodes = onnx_fp32_nodes(artifact.graph_path(g)) if precision != "fp32" else []
        commands.append(trtexec_command(artifact.graph_path(g), engines_dir / f"{g}.plan", profiles[g], precision,
                                        engines_dir / TIMING_CACHE, fp32_nodes))
    print(format_plan(artifact.path, precision, profiles, specs, cfg.decoder_layers))
    print("equivalent trtexec commands:")
    for c in commands:
        print("  " + c)
    sys.stdout.flush()
    if getattr(args, "print_only", False):
        return 0
    try:
        trt = import_tensorrt()
    except DeltaLMError as e:
        raise DeltaLMError(f"{e}; no engines were built (the trtexec commands above build them by hand)") from None
    gpu_name, capability = gpu_identity()
    _log(f"building on {gpu_name} (compute capability {capability}) with TensorRT {trt.__version__}")
    metas = {}
    with atomic_directory(engines_dir, force=True) as tmp:
        if (engines_dir / TIMING_CACHE).exists():
            shutil.copyfile(engines_dir / TIMING_CACHE, tmp / TIMING_CACHE)
        for g in graphs:
            _log(f"building the {g} engine ({precision}) ...")
            build = build_engine(artifact.graph_path(g), tmp / f"{g}.plan", profiles[g], precision, tmp / TIMING_CACHE)
            _log(f"  {g}: {build['build_seconds']:.1f}s, {build['fp32_layers']} of {build['layers']} layers pinned to fp32")
            metas[g] = engine_metadata(g, f"{ENGINES_DIR}/{g}.plan", artifact.manifest.graphs[g].file,
                                       graph_source_digest(artifact.manifest, g), precision, profiles[g],
                                       trt.__version__, gpu_name, capability, build)
        write_json_atomic(tmp / METADATA, {"tensorrt": trt.__version__, "gpu": gpu_name,
                                           "compute_capability": capability, "precision": precision,
                                           "timing_cache": TIMING_CACHE, "engines": metas})
        # the manifest stops listing the old engines before they are replaced
        manifest = read_manifest(artifact.path)
        _forget_engines(manifest)
        manifest.write(artifact.path)
    files = [f"{ENGINES_DIR}/{g}.plan" for g in graphs] + [f"{ENGINES_DIR}/{METADATA}"]
    manifest.engines = Engines(metadata=f"{ENGINES_DIR}/{METADATA}", precision=precision, tensorrt=trt.__version__,
                               gpu=gpu_name, compute_capability=str(capability),
                               files={g: f"{ENGINES_DIR}/{g}.plan" for g in graphs})
    manifest.files.update(hash_files(artifact.path, files))
    manifest.write(artifact.path)
    _log(f"wrote {engines_dir}")
    return 0
