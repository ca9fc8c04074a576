"""``translate_corpus``: text files through a pool of Ray Data actors, one output file per input.

    read_binary_files (one row per input file) -> split into (shard, line, text) rows
      -> map_batches(TranslateActor, concurrency=actors)   # one Translator per actor, retried by Ray
      -> the driver: rows of a shard gathered by line id, the shard committed atomically when whole

Every row carries its shard and line number, so output order never depends on the order in which
Ray returns batches. The driver holds the translated lines of the shards in flight (at most their
outputs), and writes the output directory (a local or shared path).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import check_output_directory
from ..errors import DeltaLMError, InputError, install_extra
from ..translator import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_LINES, BatchOptions, TranslateOptions
from .actor import TranslateActor
from .quiet import RAY_INIT_QUIET, native_stderr_without, ray_data_console_filtered
from .shards import MANIFEST_NAME, Manifest, Shard, fingerprint, resolve_shards, split_lines

RAY_EXTRA = f"translate-corpus needs Ray: {install_extra('ray')}"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how wide to run. ``address``: a running cluster (``ray start --head``), or
    None for ``RAY_ADDRESS`` / a local Ray runtime; a Ray already initialized in this process is
    used as it is."""

    address: str | None = None
    actors: int = 1
    threads_per_actor: int = 1
    gpus_per_actor: float = 0.0
    max_restarts: int = 3  # an actor that dies is restarted this often, its batches retried on it

    def validate(self) -> None:
        if self.actors < 1:
            raise InputError(f"--actors must be >= 1, got {self.actors}")
        if self.threads_per_actor < 1:
            raise InputError(f"--threads-per-actor must be >= 1, got {self.threads_per_actor}")
        if self.gpus_per_actor < 0:
            raise InputError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.max_restarts < 0:
            raise InputError(f"--max-restarts must be >= 0, got {self.max_restarts}")


@dataclass(frozen=True)
class CorpusJob:
    """What to do with every line of a run: the model, the output format, the search options and
    how the lines are read and batched. Frozen and picklable: the driver checks it once and every
    actor gets the same object. ``shortlist``: a vocabulary shortlist file (ort backend), read by
    every node at this path; the driver sets ``shortlist_sha256`` (``checked``) and each actor
    verifies it."""

    model: str
    fmt: str = "text"
    options: TranslateOptions = field(default_factory=TranslateOptions)
    batch_size: int | None = DEFAULT_BATCH_SIZE
    max_tokens: int | None = None
    chunk_lines: int = DEFAULT_CHUNK_LINES
    errors: str = "strict"
    backend: str | None = None
    src_prefix: tuple[str, ...] | None = None
    tgt_prefix: tuple[str, ...] | None = None
    shortlist: str | None = None
    shortlist_sha256: str | None = None

    def validate(self) -> None:
        self.options.validate()
        BatchOptions(self.batch_size, self.max_tokens).validate()
        if self.fmt not in ("text", "jsonl"):
            raise InputError(f"--format must be text or jsonl, got {self.fmt!r}")
        if self.options.nbest > 1 and self.fmt != "jsonl":
            raise InputError("--nbest > 1 needs --format jsonl (text output has one line per input line)")
        if not isinstance(self.chunk_lines, int) or self.chunk_lines < 1:
            raise InputError(f"--chunk-lines must be >= 1, got {self.chunk_lines}")
        if self.errors not in ("strict", "replace"):
            raise InputError(f"--errors must be strict or replace, got {self.errors!r}")

    def checked(self) -> CorpusJob:
        """This job with its model directory resolved and its shortlist file checked (format, the
        model's dictionary) and fingerprinted, in the driver, before Ray starts."""
        model = Path(self.model)
        if not model.is_dir():
            raise InputError(
                f"artifact directory {model} does not exist"
                if not model.exists()
                else f"{model} is a file (a checkpoint?), not an artifact directory: export it first "
                f"with `deltalm export {model} --spm SPM --dict DICT --out DIR`"
            )
        job = dataclasses.replace(self, model=str(model.resolve()))
        if self.shortlist is not None:
            path, digest = _open_shortlist(model, self.shortlist, self.backend)
            job = dataclasses.replace(job, shortlist=path, shortlist_sha256=digest)
        return job

    def settings(self) -> dict:
        """What decides the output of a shard. Batching only where it changes the output: with a
        shortlist, a batch's candidates are those of its sentences (beam search, greedy and
        sampling, whose generators are seeded per sentence, do not depend on it)."""
        from ..artifact import MANIFEST

        manifest = Path(self.model) / MANIFEST
        settings = {
            "model": str(Path(self.model).resolve()),
            "model_manifest": fingerprint({"m": manifest.read_text()}) if manifest.is_file() else None,
            "format": self.fmt,
            "options": dataclasses.asdict(self.options),
            "errors": self.errors,
            "backend": self.backend,
            "src_prefix": self.src_prefix,
            "tgt_prefix": self.tgt_prefix,
        }
        if self.shortlist_sha256 is not None:
            settings["shortlist_sha256"] = self.shortlist_sha256  # the bytes, not the path: a moved copy is the same
            settings["batching"] = [self.batch_size, self.max_tokens, self.chunk_lines]
        return settings


@dataclass
class ActorStats:
    lines: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0
    calls: set = field(default_factory=set)


@dataclass
class CorpusSummary:
    """What a run did. ``seconds``: from the call to the last commit; ``ray_init_seconds``:
    joining / starting Ray; ``first_result_seconds``: from the start of the pipeline to the first
    translated batch (actor start-up and model load included)."""

    shards: int = 0
    skipped: list[str] = field(default_factory=list)  # complete already (manifest verified)
    written: list[str] = field(default_factory=list)  # committed by this run, in commit order
    lines: int = 0  # translated by this run
    tokens: int = 0  # target tokens of the best hypotheses
    duplicates: int = 0  # rows Ray delivered twice (a retried batch), dropped
    seconds: float = 0.0
    ray_init_seconds: float = 0.0
    first_result_seconds: float | None = None
    pipeline_seconds: float = 0.0
    actors: dict[str, ActorStats] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return sum(len(a.calls) for a in self.actors.values())

    def lines_report(self) -> list[str]:
        rate = lambda n, s: n / s if s > 0 else 0.0  # noqa: E731
        out = [
            f"translate-corpus: {files(len(self.written))} written, {len(self.skipped)} already complete; "
            f"{self.lines} lines, {self.tokens} target tokens in {self.seconds:.1f} s "
            f"({rate(self.lines, self.seconds):.1f} lines/s, {rate(self.tokens, self.seconds):.0f} tok/s)"
        ]
        if self.actors:
            out.append(
                f"  ray: init {self.ray_init_seconds:.1f} s, first batch after "
                f"{self.first_result_seconds or 0:.1f} s, pipeline {self.pipeline_seconds:.1f} s, "
                f"{self.calls} actor calls"
            )
        for name, a in sorted(self.actors.items()):
            out.append(
                f"  actor {name}: {a.lines} lines, {a.tokens} tokens, {len(a.calls)} calls, busy "
                f"{a.busy_seconds:.1f} s ({rate(a.lines, a.busy_seconds):.1f} lines/s, "
                f"{rate(a.tokens, a.busy_seconds):.0f} tok/s)"
            )
        return out


def files(n: int) -> str:
    return f"{n} file{'' if n == 1 else 's'}"


def import_ray():
    """``ray`` and ``ray.data``, or the one-line error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError(RAY_EXTRA) from None
    return ray


def translate_corpus(
    job: CorpusJob,
    inputs: list[str],
    output_dir: str | Path,
    *,
    cluster: ClusterOptions = ClusterOptions(),
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_commit: Callable[[str], None] | None = None,
) -> CorpusSummary:
    """Translates every input file into ``output_dir`` (``NAME.txt`` -> ``NAME.txt`` or
    ``NAME.jsonl``), each output line for the input line of the same number, exactly as
    ``deltalm translate --input NAME.txt`` would write it. Shards complete from an earlier run with
    the same settings (``CorpusJob.settings``) are skipped; the others are (re)done and committed
    one by one (``on_commit`` is called with each output name once its file and manifest entry are
    written). ``log`` gets the summary lines (default: this module's logger at INFO, silent unless
    configured; the command prints them); Ray's own console output is kept quiet
    (``deltalm.cluster.quiet``). Inputs may be glob patterns, local or on a pyarrow file system."""
    started = time.perf_counter()
    log = log or logger.info  # silent unless the caller configures logging (the command prints it)
    job.validate()
    cluster.validate()
    job = job.checked()
    out_dir = Path(output_dir)
    check_output_directory(out_dir, "--output")
    ray = import_ray()

    shards = resolve_shards(list(inputs), job.fmt, out_dir)
    manifest = Manifest(out_dir)
    for shard in shards:  # never replace a file this command did not write
        path = out_dir / shard.output
        if (path.exists() or path.is_symlink()) and (shard.output not in manifest.shards or not path.is_file()):
            raise InputError(
                f"--output {out_dir}: {shard.output} exists and was not written by translate-corpus "
                f"(it is not in {MANIFEST_NAME}); nothing was changed: move it away or give another "
                "--output directory"
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create --output {out_dir}: {e.strerror or e}") from None
    config = fingerprint(job.settings())
    summary = CorpusSummary(shards=len(shards))
    todo = []
    for shard in shards:
        if manifest.is_complete(shard, config, out_dir):
            summary.skipped.append(shard.output)
        elif shard.size == 0:  # nothing to translate: no Ray needed
            manifest.commit(shard, config, [], out_dir)
            summary.written.append(shard.output)
            if on_commit:
                on_commit(shard.output)
        else:
            todo.append(shard)
    if summary.skipped:
        log(f"translate-corpus: {files(len(summary.skipped))} complete already, skipped: {', '.join(summary.skipped)}")
    if todo:
        own_runtime = not ray.is_initialized()
        t0 = time.perf_counter()
        if own_runtime:
            # address None: RAY_ADDRESS if set, else a local runtime of this machine's cores
            ray.init(address=cluster.address, include_dashboard=False, **RAY_INIT_QUIET)
        summary.ray_init_seconds = time.perf_counter() - t0
        try:
            with ray_data_console_filtered(), native_stderr_without():
                _run_pipeline(ray, todo, out_dir, manifest, config, summary, job, cluster, progress, on_commit)
        finally:
            if own_runtime:
                ray.shutdown()
    summary.seconds = time.perf_counter() - started
    for line in summary.lines_report():
        log(line)
    return summary


def _open_shortlist(model: Path, path: str | Path, backend: str | None) -> tuple[str, str]:
    """(absolute path, SHA-256 of the bytes) of a shortlist file, checked here in the driver
    before Ray starts (format, and the dictionary of the model it was built for), so that a wrong
    file is one line at once rather than failing actors after the cluster started."""
    from ..artifact import MANIFEST, read_manifest, sha256_file
    from ..shortlist import Shortlist
    from ..tokenizer import Dictionary

    if (backend or "ort") != "ort":
        raise InputError(f"--shortlist runs with --backend ort, not {backend}")
    loaded = Shortlist.load(path)  # InputError naming the file when it is none
    dict_path = model / "dict.txt"
    if (model / MANIFEST).is_file():
        dict_path = model / read_manifest(model).tokenizer.get("dict", "dict.txt")
    if dict_path.is_file():
        loaded.check_dictionary(dict_path, len(Dictionary.load(dict_path)))
    resolved = Path(path).resolve()
    return str(resolved), sha256_file(resolved)


# Ray Data has no parameter for the CPUs of repartition's tasks: they are set on the logical
# operator, an attribute of Ray's (pinned: ray[data]==2.60.0; tests/test_cluster.py checks it is
# there and set)
NO_CPU = {"num_cpus": 0}


def _dataset(ray, shards: list[Shard], chunk_lines: int):
    """Rows (shard, start, n_lines, lines) of the shards: each a chunk of ``chunk_lines`` lines
    of one file, as ``deltalm translate`` reads it; read by Ray Data (one filesystem at a time,
    unioned)."""
    import pyarrow as pa

    groups: list[tuple[object, list[Shard]]] = []
    for shard in shards:
        for fs, members in groups:
            if fs.equals(shard.fs):
                members.append(shard)
                break
        else:
            groups.append((shard.fs, [shard]))

    datasets = []
    for fs, members in groups:
        index = {s.path: s.index for s in members}

        def split(batch, index=index, chunk_lines=chunk_lines):
            cols = {"shard": [], "start": [], "n_lines": [], "lines": []}
            for data, path in zip(batch["bytes"], batch["path"]):
                if path not in index:
                    raise RuntimeError(f"Ray read {path!r}, which is none of the inputs {sorted(index)}")
                lines = split_lines(bytes(data))
                for start in range(0, len(lines), chunk_lines):
                    cols["shard"].append(index[path])
                    cols["start"].append(start)
                    cols["n_lines"].append(len(lines))
                    cols["lines"].append(lines[start : start + chunk_lines])
            return pa.table(
                {
                    "shard": pa.array(cols["shard"], pa.int32()),
                    "start": pa.array(cols["start"], pa.int64()),
                    "n_lines": pa.array(cols["n_lines"], pa.int64()),
                    "lines": pa.array(cols["lines"], pa.list_(pa.binary())),
                }
            )

        ds = ray.data.read_binary_files([s.path for s in members], filesystem=fs, include_paths=True, num_cpus=0)
        # no CPU reserved for reading: the actors may hold every CPU of the cluster, and a read
        # that waits for one would never run
        datasets.append(ds.map_batches(split, batch_size=1, batch_format="numpy", num_cpus=0))
    ds = datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])
    # one chunk a block (streaming, no shuffle): a block goes to one actor, and a file read as one
    # block would otherwise be translated by one actor however many are waiting
    ds = ds.repartition(target_num_rows_per_block=1)
    # its tasks take no CPU either (see NO_CPU: without it they wait for a CPU the actors hold and
    # the run never ends)
    op = ds._logical_plan.dag
    object.__setattr__(op, "ray_remote_args", {**(op.ray_remote_args or {}), **NO_CPU})
    return ds


def _run_pipeline(
    ray, todo, out_dir, manifest, config, summary, job: CorpusJob, cluster: ClusterOptions, progress, on_commit
) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    names = {s.index: s.uri for s in todo}
    with warnings.catch_warnings():  # max_restarts / max_task_retries are only taken as **ray_remote_args
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        translated = _translate_stage(ray, todo, job, cluster, names)

    pending: dict[int, dict[int, str]] = defaultdict(dict)
    expected: dict[int, int] = {}
    by_index = {s.index: s for s in todo}
    t0 = time.perf_counter()
    try:
        for batch in translated.iter_batches(batch_size=None, batch_format="numpy"):
            if summary.first_result_seconds is None:
                summary.first_result_seconds = time.perf_counter() - t0
            for shard, line, n_lines, out, tokens, actor, call, seconds in zip(
                batch["shard"],
                batch["line"],
                batch["n_lines"],
                batch["out"],
                batch["tokens"],
                batch["actor"],
                batch["call"],
                batch["seconds"],
            ):
                shard, line = int(shard), int(line)
                rows = pending[shard]
                if line in rows:
                    summary.duplicates += 1
                    continue
                rows[line] = str(out)
                expected[shard] = int(n_lines)
                summary.lines += 1
                summary.tokens += int(tokens)
                stats = summary.actors.setdefault(str(actor), ActorStats())
                stats.lines += 1
                stats.tokens += int(tokens)
                stats.busy_seconds += float(seconds)
                stats.calls.add(int(call))
                if len(rows) == expected[shard]:
                    manifest.commit(by_index[shard], config, [rows[i] for i in range(expected[shard])], out_dir)
                    summary.written.append(by_index[shard].output)
                    del pending[shard]
                    if on_commit:
                        on_commit(by_index[shard].output)
    except Exception as e:
        user_error = _deltalm_error_in(e)
        if user_error is not None:
            raise user_error from None
        raise
    summary.pipeline_seconds = time.perf_counter() - t0
    missing = [s.uri for s in todo if s.output not in summary.written]
    if missing:  # Ray finished without delivering every line: never commit a short file
        raise DeltaLMError(f"the cluster returned incomplete results for {', '.join(missing)}; rerun to redo them")


def _translate_stage(ray, todo, job: CorpusJob, cluster: ClusterOptions, names: dict[int, str]):
    device = "cuda" if cluster.gpus_per_actor > 0 else None
    return _dataset(ray, todo, job.chunk_lines).map_batches(
        TranslateActor,
        fn_constructor_kwargs=dict(job=job, threads=cluster.threads_per_actor, device=device, shard_names=names),
        compute=ray.data.ActorPoolStrategy(size=cluster.actors),
        batch_size=1,
        batch_format="numpy",
        num_cpus=cluster.threads_per_actor,
        num_gpus=cluster.gpus_per_actor or None,
        max_restarts=cluster.max_restarts,
        max_task_retries=cluster.max_restarts,
    )


def _deltalm_error_in(e: BaseException) -> DeltaLMError | None:
    """The DeltaLMError an actor raised, out of Ray's wrappers. Ray Data keeps the original
    exception only as text (the worker's traceback, whose line ``deltalm.errors.NAME: message``
    names it); a plain RayTaskError keeps it as ``cause``."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, DeltaLMError):
            return InputError(str(cause))
        if isinstance(e, DeltaLMError) and cause is None:
            return InputError(str(e))
        found = re.findall(r"^deltalm\.errors\.\w+: (.+)$", str(e), flags=re.MULTILINE)
        if found:
            return InputError(found[-1])
        e = (cause if isinstance(cause, BaseException) else None) or e.__cause__ or e.__context__
    return None
