"""``deltalm engines DIR``: TensorRT engines for an artifact's encoder and decoder_step graphs.

Engines are built STRONGLY TYPED from the artifact's own ONNX graphs: every tensor keeps the type
the graph gives it, so the precision of the engines is the precision of the export. An fp32
export gives fp32 engines (TF32 off: Polygraphy's default); an fp16 export gives fp16 engines
whose fp32 islands (LayerNormalization, Softmax, TopK and the output head: the step's
log-sum-exp, rules and log-probs; chosen by the exporter and checked by the export's own parity
verdict) are the precision decisions. This is the only way TensorRT 11 builds (weak typing, ``BuilderFlag.FP16`` and layer precision pins are gone) and the
recommended one since 10.12: ``TENSORRT_SUPPORTED`` in ``deltalm.backends.trt``.

The build goes through Polygraphy's TensorRT loaders (``NetworkFromOnnxPath(strongly_typed=True)``,
``CreateConfig(profiles=..., load_timing_cache=...)``, ``EngineBytesFromNetwork(save_timing_cache=...)``)
so that differences between TensorRT versions are NVIDIA's tool's problem. The engine bytes are
written into the work directory by ``deltalm.atomic`` (Polygraphy's ``SaveEngine`` wants a
deserialized engine, which would cost device memory for nothing).

The plan (optimization profiles, equivalent ``trtexec --stronglyTyped`` command lines) is pure
logic and prints without TensorRT (``--print-only``). Building needs TensorRT, Polygraphy and a
GPU; it writes ``DIR/engines/{encoder,decoder_step}.plan`` and ``engines.json`` (what each engine
was built from and for) into a hidden sibling directory that replaces ``DIR/engines`` in one
rename, keeps a persistent timing cache there (``timing.cache``, reused only by the same TensorRT
version on the same GPU model), and records the engines in ``manifest.json`` (``_unlist_engines``
and ``_list_engines`` are the only places that write it).

Profiles come from the symbolic axes of ``runtime/graphs.py``: ``batch`` (sentences given to the
encoder), ``src_len``, ``sents`` (sentences of a decoder step), ``rows`` = sentences x beam,
``new_len`` (tokens fed per row: 1), ``cache_len`` (positions of the self-attention cache the step
reads: 0 on the first step, up to ``--max-tgt-len``), ``score_width`` (ids scored per position, up
to ``SCORE_WIDTH``); the output-only ``vocab`` axis of ``log_probs`` is the vocabulary.

Not built: bf16 engines (a bf16 export could not be parity-checked here: ONNX Runtime's CPU
provider has no bf16 MatMul / Add / Mul kernels), INT8 / FP8 engines (TensorRT 11 builds them only
from explicit Q/DQ graphs; an int8 artifact holds ONNX Runtime's dynamic quantization instead),
several optimization profiles per engine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

from deltalm.artifact import hash_files, open_artifact, read_manifest
from deltalm.atomic import atomic_directory, write_json_atomic
from deltalm.backends.trt import (
    ENGINE_GRAPHS,
    check_engine_compat,
    device_allocations,
    gpu_identity,
    graph_source_digest,
    import_tensorrt,
    numpy_dtype,
    plan_buffers,
    profile_axes,
    profile_to_json,
    vocabulary_axis,
)
from deltalm.config import ModelConfig
from deltalm.errors import DeltaLMError, ExportError, InputError
from deltalm.graphs import GraphSpec, decoder_step_spec, encoder_spec
from deltalm.manifest import Engines

ENGINES_DIR = "engines"
METADATA = "engines.json"
TIMING_CACHE = "timing.cache"
PRECISIONS = ("fp32", "fp16")  # the artifact precisions engines are built from

__all__ = [
    "build_engines",
    "derive_profiles",
    "load_profile_override",
    "apply_profile_override",
    "trtexec_command",
    "build_engine",
    "engine_metadata",
    "engine_precision",
    "check_engine_compat",
    "engines_command",
    "axis_bounds",
]


def _log(msg: str) -> None:
    """Progress of a build: through logging, silent unless configured (``deltalm engines`` prints it)."""
    logging.getLogger(__name__).info(msg)


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


# Tokens fed per row: 1, a search step. Scoring a whole target in one step (new_len up to
# --max-tgt-len + 1) is left to the ort backend: the step builds [rows, new_len, vocabulary] logits,
# and TensorRT sizes its activation memory (and we our log_probs buffer) for the profile maximum:
# deltalm-base with 40 rows x 257 tokens x 250001 ids in float32 is 10 GB, in every context, for a
# feature the search does not use. A --profile file can still widen it.
NEW_LEN = 1
SCORE_WIDTH = 64  # token ids scored per position at most (a target token, the next constraint tokens)


def axis_bounds(
    max_batch: int, max_beam: int, max_src_len: int, max_tgt_len: int, max_positions: int
) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic axis of the graphs' inputs. opt: half the batch at full
    beam, a quarter of the longest source and target, one scored id: the shapes TensorRT tunes its
    kernels for."""
    for flag, value in (
        ("--max-batch", max_batch),
        ("--max-beam", max_beam),
        ("--max-src-len", max_src_len),
        ("--max-tgt-len", max_tgt_len),
    ):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{flag} must be an integer >= 1, got {value!r}")
    if max_src_len > max_positions:
        raise InputError(f"--max-src-len {max_src_len} exceeds the model's max_positions {max_positions}")
    if max_tgt_len >= max_positions:
        raise InputError(
            f"--max-tgt-len {max_tgt_len} must be < the model's max_positions {max_positions} "
            f"(the decoder step's cache_len reaches at most max_positions - 1)"
        )
    opt_batch = max(1, max_batch // 2)
    return {
        "batch": (1, opt_batch, max_batch),
        "sents": (1, opt_batch, max_batch),
        "rows": (1, opt_batch * max_beam, max_batch * max_beam),
        "new_len": (1, 1, NEW_LEN),
        "src_len": (1, max(1, max_src_len // 4), max_src_len),
        "cache_len": (0, max(1, max_tgt_len // 4), max_tgt_len),
        "score_width": (1, 1, SCORE_WIDTH),
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


def derive_profiles(
    manifest_or_cfg, max_batch: int, max_beam: int, max_src_len: int, max_tgt_len: int
) -> dict[str, dict[str, tuple[tuple, tuple, tuple]]]:
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
                raise InputError(f'profile: {graph}.{name} must be {{"min": [...], "opt": [...], "max": [...]}}')
            shapes = []
            for key in ("min", "opt", "max"):
                shape = entry[key]
                if not isinstance(shape, list) or not all(
                    isinstance(d, int) and not isinstance(d, bool) for d in shape
                ):
                    raise InputError(f"profile: {graph}.{name} {key} must be a list of integers, got {shape!r}")
                if len(shape) != len(t.shape):
                    raise InputError(
                        f"profile: {graph}.{name} {key} has rank {len(shape)}, the input has rank {len(t.shape)} {list(t.shape)}"
                    )
                for i, (d, want) in enumerate(zip(shape, t.shape)):
                    if not isinstance(want, str) and d != want:
                        raise InputError(f"profile: {graph}.{name} {key} dim {i} must be {want}, got {d}")
                    least = 0 if want == "cache_len" else 1  # the first step reads an empty cache
                    if d < least:
                        raise InputError(f"profile: {graph}.{name} {key} dim {i} ({want}) must be >= {least}, got {d}")
                shapes.append(tuple(shape))
            lo, opt, hi = shapes
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise InputError(
                    f"profile: {graph}.{name} needs min <= opt <= max in every dim, got {list(lo)} / {list(opt)} / {list(hi)}"
                )
            merged[graph][name] = (lo, opt, hi)
    validate_profiles(merged, specs, cfg)
    return merged


def validate_profiles(profiles: dict, specs: dict[str, GraphSpec], cfg: ModelConfig) -> None:
    """Shared axes agree within each graph, the step takes every batch and source the encoder does
    (the encoder's ``batch`` against the step's ``sents``), and the model's position limits hold."""
    axes = {g: profile_axes(specs[g], profiles[g]) for g in profiles}
    if "encoder" in axes and "decoder_step" in axes:
        for enc_axis, step_axis in (("batch", "sents"), ("src_len", "src_len")):
            a, b = axes["encoder"].get(enc_axis), axes["decoder_step"].get(step_axis)
            if a and b and a[2] > b[2]:
                raise InputError(
                    f"profile: encoder allows {enc_axis} up to {a[2]} but decoder_step {step_axis} only up to {b[2]}"
                )
    for g, ax in axes.items():
        if "src_len" in ax and ax["src_len"][2] > cfg.max_positions:
            raise InputError(
                f"profile: {g} src_len max {ax['src_len'][2]} exceeds the model's max_positions {cfg.max_positions}"
            )
        if "cache_len" in ax and ax["cache_len"][2] >= cfg.max_positions:
            raise InputError(
                f"profile: {g} cache_len max {ax['cache_len'][2]} must be < the model's max_positions {cfg.max_positions}"
            )


# ---------------------------------------------------------------------------------------------
# precision: the artifact's


def engine_precision(artifact_precision: str, requested: str | None = None) -> str:
    """The precision of an artifact's engines: the artifact's own (strongly typed, the ONNX
    graphs carry every type). ``requested`` (``--precision``), when given, must agree; otherwise
    InputError in one line saying which export to make first. A conversion in a work directory
    is not offered: the fp16 graph is only trusted after the export's parity verdict against
    PyTorch (``Thresholds.for_precision("fp16")``), which an engine-side conversion would skip."""
    if requested == "bf16":
        raise InputError(
            "bf16 engines are not built: a bf16 export cannot be parity-checked here (ONNX Runtime's "
            "CPU provider has no bf16 MatMul / Add kernels); build fp16 engines from an fp16 export"
        )
    if requested is not None and requested not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if artifact_precision not in PRECISIONS:
        raise InputError(
            f"an {artifact_precision} artifact holds ONNX Runtime's dynamic quantization, not the Q/DQ "
            "graph TensorRT builds int8 engines from; build engines from an fp32 or fp16 export"
        )
    if requested is not None and requested != artifact_precision:
        raise InputError(
            f"this artifact is {artifact_precision}, and engines are built in the precision of its ONNX "
            f"graphs (strongly typed): export {requested} first (`deltalm export CKPT --precision "
            f"{requested} --out DIR`) and build the engines from that artifact"
        )
    return artifact_precision


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(onnx_path, engine_path, profile: dict, timing_cache) -> str:
    """The trtexec command line that builds the same engine (for users with trtexec but not the
    Python bindings): strongly typed, no precision flags (the graph has the types). Scalar
    inputs need no shapes."""
    shaped = [(name, b) for name, b in profile.items() if len(b[0])]
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped"]
    for flag, i in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        if shaped:
            args.append(f"{flag}=" + ",".join(f"{name}:{_dims(b[i])}" for name, b in shaped))
    args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(a) for a in args)


# ---------------------------------------------------------------------------------------------
# the TensorRT build through Polygraphy (needs TensorRT and a GPU)


def _polygraphy():
    """Polygraphy's TensorRT loaders, logger and exception (imported lazily: they import tensorrt)."""
    try:
        from polygraphy.backend import trt as loaders
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise DeltaLMError(
            "`deltalm engines` builds through Polygraphy, which is not installed "
            "(pip install polygraphy==0.53.6, or the package's `trt` extra)"
        ) from None
    return loaders, PolygraphyException, G_LOGGER


def _check_input_types(network, spec: GraphSpec | None, onnx_path: Path) -> None:
    """The parsed network's inputs have the types the artifact declares (a strongly typed
    engine keeps them, and the runtime sizes its buffers from them)."""
    if spec is None:
        return
    want = {t.name: t.dtype for t in spec.inputs}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name in want and str(numpy_dtype(t.dtype.name)) != want[t.name]:
            raise ExportError(
                f"{onnx_path}: TensorRT parsed input {t.name} as {t.dtype.name}, the artifact declares {want[t.name]}"
            )


def _shape_tensor_values(network, onnx_path: Path) -> dict[str, tuple]:
    """The value ranges of the network inputs TensorRT computes shapes from (``is_shape_tensor``):
    for those, a profile gives values, not shapes (Polygraphy passes them to ``set_shape_input``).
    A boolean scalar (``want_log_probs``, if TensorRT slices the log-probs by it) ranges over
    False (opt: the search step's usual value) and True; any other is refused, naming it."""
    values = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if not t.is_shape_tensor:
            continue
        if t.dtype.name != "BOOL" or tuple(t.shape) != ():
            raise ExportError(
                f"{onnx_path}: TensorRT computes shapes from input {t.name} ({t.dtype.name} "
                f"{list(t.shape)}), whose value range deltalm does not know"
            )
        values[t.name] = ((0,), (0,), (1,))
    return values


def build_engine(onnx_path, engine_path, profile: dict, timing_cache_path, spec: GraphSpec | None = None) -> dict:
    """Parse ``onnx_path`` into a strongly typed network, build one engine with one optimization
    profile ``{input: (min, opt, max)}``, write it to ``engine_path``. The timing cache at
    ``timing_cache_path`` is read if present and written back (merged). ``spec``: the graph's
    declaration, whose input types the parsed network must have. Returns {"build_seconds",
    "layers"}. TensorRT ``TENSORRT_SUPPORTED``, through Polygraphy."""
    import_tensorrt()
    loaders, PolygraphyException, G_LOGGER = _polygraphy()
    onnx_path, engine_path, cache = Path(onnx_path), Path(engine_path), Path(timing_cache_path)
    t0 = time.perf_counter()
    try:
        # Polygraphy logs on stdout, where the plan goes: its warnings and TensorRT's go to stderr
        with contextlib.redirect_stdout(sys.stderr), G_LOGGER.verbosity(G_LOGGER.WARNING):
            builder, network, parser = loaders.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
            _check_input_types(network, spec, onnx_path)
            shapes = loaders.Profile()
            for name, bounds in (profile | _shape_tensor_values(network, onnx_path)).items():
                shapes.add(name, *bounds)  # scalars too: () for min, opt and max
            config = loaders.CreateConfig(profiles=[shapes], load_timing_cache=str(cache) if cache.exists() else None)
            serialized = loaders.EngineBytesFromNetwork(
                (builder, network, parser), config=config, save_timing_cache=str(cache)
            )()
            layers = network.num_layers
    except PolygraphyException as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ExportError(f"{onnx_path}: the TensorRT build failed: {reason} (see the log above)") from None
    finally:
        Path(f"{cache}.lock").unlink(missing_ok=True)  # Polygraphy's lock file for the cache
    seconds = time.perf_counter() - t0
    with open(engine_path, "wb") as f:
        f.write(serialized)
    return {"build_seconds": round(seconds, 2), "layers": layers}


def engine_metadata(
    graph: str,
    engine_file: str,
    onnx_file: str,
    onnx_sha256: str,
    precision: str,
    profile: dict,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    build: dict | None = None,
) -> dict:
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
# the library function and the command


def format_plan(path: Path, precision: str, profiles: dict, specs: dict[str, GraphSpec], cfg: ModelConfig) -> str:
    """What will be built: per graph the axis bounds and each input's min/opt/max shapes, and the
    device memory ``--backend trt`` allocates for these profiles."""
    islands = "; LayerNorm, Softmax, TopK and the output head in fp32, as exported" if precision == "fp16" else ""
    lines = [f"TensorRT engines for {path} ({precision}, strongly typed{islands})"]
    plans = {}
    for graph, profile in profiles.items():
        axes = profile_axes(specs[graph], profile)
        lines.append(
            f"{graph}: " + ", ".join(f"{a} {lo}/{opt}/{hi}" for a, (lo, opt, hi) in axes.items()) + "  (min/opt/max)"
        )
        width = max(len(n) for n in profile)
        for name, (lo, opt, hi) in profile.items():
            if len(lo):
                lines.append(f"  {name:<{width}}  min {list(lo)}  opt {list(opt)}  max {list(hi)}")
        plans[graph] = plan_buffers(specs[graph], profile, output_axes=vocabulary_axis(cfg))
    if "decoder_step" in plans:
        total = sum(device_allocations(plans["encoder"], plans["decoder_step"], cfg.decoder_layers).values())
        lines.append(f"device buffers of --backend trt for these profiles (allocated once): {total / 2**20:.1f} MiB")
    return "\n".join(lines)


def _graph_sources(artifact, graphs) -> dict[str, tuple[str, str]]:
    """{graph: (onnx file, source digest)} read from the manifest."""
    return {g: (artifact.manifest.graphs[g].file, graph_source_digest(artifact.manifest, g)) for g in graphs}


def _unlist_engines(artifact_path: Path):
    """Remove the engines from manifest.json (before they are replaced); returns the manifest."""
    manifest = read_manifest(artifact_path)
    manifest.engines = None
    manifest.files = {n: d for n, d in manifest.files.items() if not n.startswith(ENGINES_DIR + "/")}
    manifest.write(artifact_path)
    return manifest


def _list_engines(artifact_path: Path, manifest, section: Engines, files: list[str]) -> None:
    """Record the engines (``section``) and the sha256 of their ``files`` in manifest.json."""
    manifest.engines = section
    manifest.files.update(hash_files(artifact_path, files))
    manifest.write(artifact_path)


def _reusable_timing_cache(engines_dir: Path, trt_version: str, gpu_name: str) -> Path | None:
    """The previous build's timing cache, if the same TensorRT version built it on the same GPU
    model (per its engines.json); a cache from elsewhere only costs a warning and time."""
    cache, meta = engines_dir / TIMING_CACHE, engines_dir / METADATA
    if not cache.exists():
        return None
    try:
        previous = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if previous.get("tensorrt") == trt_version and previous.get("gpu") == gpu_name:
        return cache
    _log(f"not reusing {cache}: it was written by TensorRT {previous.get('tensorrt')} on {previous.get('gpu')}")
    return None


def build_engines(
    artifact_dir,
    precision: str | None = None,
    max_batch: int = 8,
    max_beam: int = 5,
    max_src_len: int = 256,
    max_tgt_len: int = 256,
    profile=None,
    print_only: bool = False,
) -> dict | None:
    """Plan and build the TensorRT engines of the artifact at ``artifact_dir``. Prints the plan
    and the equivalent trtexec command lines on stdout. ``precision``: None or the artifact's
    own (``engine_precision``); ``profile``: a ``--profile`` JSON file overriding the derived
    shapes. Returns the engines.json metadata written, or None with ``print_only``. Raises
    DeltaLMError subclasses (one line each); on failure the previous engines stay."""
    artifact = open_artifact(artifact_dir)
    cfg = artifact.config
    precision = engine_precision(artifact.precision, precision)
    graphs = [g for g in ENGINE_GRAPHS if artifact.has_graph(g)]
    specs = {g: artifact.graph_spec(g) for g in graphs}
    profiles = derive_profiles(artifact, max_batch, max_beam, max_src_len, max_tgt_len)
    if profile:
        profiles = apply_profile_override(profiles, load_profile_override(profile), artifact)
    engines_dir = artifact.path / ENGINES_DIR
    commands = [
        trtexec_command(artifact.graph_path(g), engines_dir / f"{g}.plan", profiles[g], engines_dir / TIMING_CACHE)
        for g in graphs
    ]
    print(format_plan(artifact.path, precision, profiles, specs, cfg))
    print("equivalent trtexec commands:")
    for c in commands:
        print("  " + c)
    sys.stdout.flush()
    if print_only:
        return None
    try:
        trt = import_tensorrt()
        _polygraphy()
    except DeltaLMError as e:
        raise DeltaLMError(f"{e}; no engines were built (the trtexec commands above build them by hand)") from None
    gpu_name, capability = gpu_identity()
    _log(f"building on {gpu_name} (compute capability {capability}) with TensorRT {trt.__version__}, strongly typed")
    sources = _graph_sources(artifact, graphs)
    previous_cache = _reusable_timing_cache(engines_dir, trt.__version__, gpu_name)
    metas = {}
    with atomic_directory(engines_dir, force=True, artifact=False) as tmp:
        if previous_cache is not None:
            shutil.copyfile(previous_cache, tmp / TIMING_CACHE)
        for g in graphs:
            _log(f"building the {g} engine ({precision}) ...")
            build = build_engine(artifact.graph_path(g), tmp / f"{g}.plan", profiles[g], tmp / TIMING_CACHE, specs[g])
            _log(f"  {g}: {build['build_seconds']:.1f}s, {build['layers']} layers")
            metas[g] = engine_metadata(
                g,
                f"{ENGINES_DIR}/{g}.plan",
                sources[g][0],
                sources[g][1],
                precision,
                profiles[g],
                trt.__version__,
                gpu_name,
                capability,
                build,
            )
        metadata = {
            "tensorrt": trt.__version__,
            "gpu": gpu_name,
            "compute_capability": capability,
            "precision": precision,
            "strongly_typed": True,
            "timing_cache": TIMING_CACHE,
            "engines": metas,
        }
        write_json_atomic(tmp / METADATA, metadata)
        manifest = _unlist_engines(artifact.path)  # the manifest stops listing the old engines before they go
    _list_engines(
        artifact.path,
        manifest,
        Engines(
            metadata=f"{ENGINES_DIR}/{METADATA}",
            precision=precision,
            tensorrt=trt.__version__,
            gpu=gpu_name,
            compute_capability=str(capability),
            files={g: f"{ENGINES_DIR}/{g}.plan" for g in graphs},
        ),
        [f"{ENGINES_DIR}/{g}.plan" for g in graphs] + [f"{ENGINES_DIR}/{METADATA}"],
    )
    _log(f"wrote {engines_dir}")
    return metadata


def engines_command(args) -> int:
    """``deltalm engines``: the argparse namespace onto ``build_engines``."""
    build_engines(
        args.dir,
        precision=args.precision,
        max_batch=args.max_batch,
        max_beam=args.max_beam,
        max_src_len=args.max_src_len,
        max_tgt_len=args.max_tgt_len,
        profile=args.profile,
        print_only=args.print_only,
    )
    return 0
