"""Numerical parity of exported graphs against the PyTorch model, on shapes different from the
trace shapes, and end-to-end token agreement of ``--backend ort`` with ``--backend torch``.

Errors reported per output: ``max_abs`` = max |ort - torch|; ``max_rel`` = max |ort - torch| /
|torch| over elements with |torch| >= 1e-3 (smaller values make relative error meaningless).
For top-k outputs: the fraction of equal ids, and of rows whose top-1 id agrees.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deltalm.compare import Thresholds, compare_arrays, compare_translations, decisive_top1
from deltalm.errors import ExportError, InputError
from deltalm.graphs import RULES_MARGIN, SHORTLIST_STEP, GraphSpec, cache_names, cross_names, per_layer
from deltalm.tokenizer import collate

from .file_pages import TakeTurns, mapped_files
from .graphs import DecoderStepGraph, EncoderGraph


@dataclass(frozen=True)
class EncoderCase:
    lengths: tuple[int, ...]  # real tokens per row (</s> included); rows are left-padded

    @property
    def name(self) -> str:
        return f"batch={len(self.lengths)} lengths={list(self.lengths)}"


@dataclass(frozen=True)
class StepCase:
    lengths: tuple[int, ...]  # source lengths of the step's sentences
    group: int  # hypotheses per sentence
    cache_len: int  # cache capacity; each row is at a random position up to it
    new_len: int = 1  # tokens fed per row

    @property
    def name(self) -> str:
        return f"src={list(self.lengths)} group={self.group} cache={self.cache_len} new={self.new_len}"


def default_cases(cfg) -> tuple[list[EncoderCase], list[StepCase]]:
    near_max = max(cfg.max_positions - 4, 8)
    enc = [EncoderCase((1,)), EncoderCase((7,)), EncoderCase((7, 3, 1)), EncoderCase((near_max, 5, 1))]
    step = [
        StepCase((1,), 1, 0),
        StepCase((7,), 5, 1),
        StepCase((7, 3, 1), 2, 17),
        StepCase((9, 4), 1, 0, new_len=6),  # scoring: a whole target at once
        StepCase((near_max, 2, 5), 1, 3),
    ]
    return enc, step


@dataclass(frozen=True)
class ParityText:
    """The source sentences of the check: token ids as the runtime makes them (``</s>`` last),
    and where they come from (``origin``, recorded in parity.json)."""

    sentences: tuple[tuple[int, ...], ...]
    origin: str


SAMPLED_SENTENCES = 16  # sentences of the end-to-end check (and the pool the graph cases draw from)
SAMPLED_PIECES = (4, 24)  # pieces per sampled sentence, inclusive


def sample_text(tokenizer, n: int = SAMPLED_SENTENCES, seed: int = 0) -> ParityText:
    """``n`` sentences of text sampled from the tokenizer's own sentencepiece model: pieces drawn
    independently with the model's probabilities (``exp(score)``; control, unknown, unused and
    byte pieces left out), decoded to text and encoded back through the dictionary, as a user's
    line would be. Frequent pieces come often and rare ones seldom, as in real text; a uniform draw
    of ids mostly hits the rare rows of the embedding table, where a model is least trained and its
    outputs nearest to ties."""
    sp = tokenizer.sp
    ids = [
        i
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))
    ]
    scores = np.array([sp.get_score(i) for i in ids], dtype=np.float64)
    p = np.exp(scores - scores.max())
    p /= p.sum()
    rng = np.random.default_rng(seed)
    sentences: list[tuple[int, ...]] = []
    for _ in range(50 * n):
        if len(sentences) == n:
            break
        pieces = rng.choice(ids, size=int(rng.integers(SAMPLED_PIECES[0], SAMPLED_PIECES[1] + 1)), p=p)
        encoded = tokenizer.encode(sp.decode_ids([int(i) for i in pieces]))
        if len(encoded) > 1:
            sentences.append(tuple(encoded))
    if not sentences:
        raise ExportError(f"{tokenizer.spm_path}: no sentence could be sampled from this sentencepiece model")
    return ParityText(
        tuple(sentences), f"{len(sentences)} sentences sampled from {Path(tokenizer.spm_path).name} (seed {seed})"
    )


def corpus_lines(path) -> list[str]:
    """The non-empty lines of a ``--parity-corpus`` file (InputError, one line, if there are none
    or it cannot be read as UTF-8)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise InputError(f"--parity-corpus {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--parity-corpus {path}: cannot read it as UTF-8 text ({e})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise InputError(f"--parity-corpus {path}: no non-empty line")
    return lines


def corpus_text(tokenizer, path, n: int = SAMPLED_SENTENCES, seed: int = 0) -> ParityText:
    """Up to ``n`` non-empty lines of the user's file ``path`` (a fixed random choice when there
    are more), encoded as the runtime encodes them."""
    lines = corpus_lines(path)
    if len(lines) > n:
        keep = np.sort(np.random.default_rng(seed).choice(len(lines), size=n, replace=False))
        lines = [lines[i] for i in keep]
    sentences = tuple(tuple(tokenizer.encode(line)) for line in lines)
    return ParityText(sentences, f"{len(sentences)} lines of {path}")


def parity_text(spm=None, dictionary=None, corpus=None, seed: int = 0) -> ParityText | None:
    """The check's sentences: the user's ``corpus`` when given, else text sampled from ``spm``;
    None without a tokenizer (encoder-only exports without one: random ids then)."""
    if not (spm and dictionary):
        if corpus:
            raise InputError("--parity-corpus needs the model's tokenizer (--spm and --dict)")
        return None
    from deltalm.tokenizer import Tokenizer

    tokenizer = Tokenizer(spm, dictionary)
    return corpus_text(tokenizer, corpus, seed=seed) if corpus else sample_text(tokenizer, seed=seed)


class SourceRng(np.random.Generator):
    """The random generator of the graph cases (numpy's default generator, same stream for a
    seed), carrying the check's ``ParityText``: ``make_sources`` draws its rows from it."""

    def __init__(self, seed: int, text: ParityText | None = None):
        super().__init__(np.random.PCG64(seed))
        self.text = text


def make_sources(cfg, lengths, rng) -> np.ndarray:
    """A left-padded source batch [len(lengths), max(lengths)] int64, row r holding lengths[r]
    tokens (``</s>`` last). With a ``SourceRng`` carrying text, a row is a run of the text's
    sentences (their ``</s>`` dropped, joined, cut at the length) from a random one on; otherwise
    random ids."""
    text = getattr(rng, "text", None)
    width = max(lengths)
    src = np.full((len(lengths), width), cfg.pad, dtype=np.int64)
    for r, n in enumerate(lengths):
        if n <= 1:
            body = np.zeros(0, dtype=np.int64)
        elif text is not None:
            start, pieces = int(rng.integers(len(text.sentences))), []
            while sum(len(b) for b in pieces) < n - 1:
                pieces.append(text.sentences[(start + len(pieces)) % len(text.sentences)][:-1])
            body = np.concatenate([np.asarray(b, dtype=np.int64) for b in pieces])[: n - 1]
        else:
            body = rng.integers(4, cfg.vocab_size, size=n - 1)
        src[r, width - n :] = np.concatenate([body, [cfg.eos]])
    return src


def compare(name: str, got: np.ndarray, want: np.ndarray) -> dict:
    return {"output": name} | compare_arrays(got, want)


# The check runs ONNX Runtime with its weight prepacking and its memory arena off, because it
# holds the PyTorch model at the same time. A prepacked session copies every MatMul weight into a
# layout of its own while it is built (the step of deltalm-base: 0.7 GB more while it builds,
# 1.4 GB of anonymous memory after, instead of mapping weights.data); the arena keeps the largest
# activations of any case (the encoder at 508 tokens: 0.6 GB). Neither changes a graph or a weight;
# prepacking moves results by about 1e-6 (measured on base's step log-probs: 2.9e-6), far under
# every threshold of the verdict. fp16 graphs also run without ONNX Runtime's graph optimizations:
# the CPU has no fp16 kernels for most of them, and the optimizer would fold an fp32 copy of every
# fp16 weight into memory (1.5 GB of anonymous memory on base, which no turn can give back);
# unoptimized, each node casts its fp16 weight when it runs. That is the same arithmetic (fp32 on
# fp16-rounded weights) without the fusions: the step's log-probs move by 8e-3 (base), under the
# fp16 verdict's resolution. On a GPU (fp16's target) the GPU check runs the optimized graph.
PREPACKING_OFF = ("session.disable_prepacking", "1")


def check_options(session_options, precision: str = "fp32"):
    """``session_options`` (a function of ``threads``) as the check runs ONNX Runtime: prepacking
    and memory arena off, and for fp16 graph optimizations off (see PREPACKING_OFF)."""
    import onnxruntime as ort

    def options(threads: int | None = None):
        so = session_options(threads)
        so.add_session_config_entry(*PREPACKING_OFF)
        so.enable_cpu_mem_arena = False
        if precision == "fp16":
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return so

    return options


# The check compares the PyTorch model (its weights mapped from the checkpoint) with ONNX Runtime
# (its weights mapped from weights.data), one computation after the other: each side's mapped
# pages are given back before the other side runs (deltalm.export.file_pages.TakeTurns), so that
# the two models' weights are not resident at once.


@dataclass
class _Check:
    """What the sessions of one graph_parity call need: the turns, the artifact's precision."""

    turns: TakeTurns
    precision: str


_check: contextvars.ContextVar[_Check | None] = contextvars.ContextVar("deltalm_parity_check", default=None)


def take_turns(model, artifact) -> TakeTurns:
    """The check's two sides: "torch" (the files the model's tensors are mapped from, if any) and
    "ort" (the artifact's weight files)."""
    weights = {f for g in artifact.manifest.graphs.values() for f in g.files if not f.endswith(".onnx")}
    torch_files = mapped_files(t.data_ptr() for t in [*model.parameters(), *model.buffers()])
    return TakeTurns({"torch": torch_files, "ort": [artifact.path / f for f in sorted(weights)]})


class _TurnSession:
    """An ONNX Runtime session whose every ``run`` takes the "ort" turn and hands it back after
    (the PyTorch side runs next, between two runs, without this session's pages)."""

    def __init__(self, session, turns: TakeTurns):
        self._session, self._turns = session, turns

    def run(self, *args, **kwargs):
        self._turns.turn("ort")
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self._turns.turn("torch")

    def __getattr__(self, name):
        return getattr(self._session, name)


class _TurnBackend:
    """A backend (``encode`` / ``run_step``) that takes ``side``'s turn before it computes."""

    def __init__(self, backend, turns: TakeTurns, side: str):
        self._backend, self._turns, self._side = backend, turns, side

    def encode(self, *args, **kwargs):
        self._turns.turn(self._side)
        return self._backend.encode(*args, **kwargs)

    def run_step(self, *args, **kwargs):
        self._turns.turn(self._side)
        return self._backend.run_step(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def _ort_session(path):
    """A session of the graph at ``path`` as the check runs it (``check_options``; inside
    graph_parity, taking turns with the PyTorch model)."""
    import onnxruntime as ort

    from deltalm.backends.ort import session_options

    check = _check.get()
    options = check_options(session_options, check.precision if check else "fp32")
    session = ort.InferenceSession(str(path), options(), providers=["CPUExecutionProvider"])
    return _TurnSession(session, check.turns) if check is not None else session


@contextlib.contextmanager
def _backend_sessions_for_check(precision: str):
    """``OrtBackend`` builds its sessions from ``deltalm.backends.ort.session_options``; inside the
    block, as the check runs them (``check_options``)."""
    import deltalm.backends.ort as ort_backend

    real = ort_backend.session_options
    ort_backend.session_options = check_options(real, precision)
    try:
        yield
    finally:
        ort_backend.session_options = real


def graph_parity(model, artifact, seed: int = 0, text: ParityText | None = None) -> list[dict]:
    """Every output of every graph, ORT (CPU) against the PyTorch graphs, per case; the cases'
    sources drawn from ``text`` when given (``make_sources``)."""
    token = _check.set(_Check(take_turns(model, artifact), artifact.precision))
    try:
        return _graph_parity(model, artifact, SourceRng(seed, text))
    finally:
        _check.reset(token)


def _graph_parity(model, artifact, rng) -> list[dict]:
    cfg = model.cfg
    enc_cases, step_cases = default_cases(cfg)
    encoder = EncoderGraph(model).eval()
    enc_spec: GraphSpec = artifact.graph_spec("encoder")
    enc_sess = _ort_session(artifact.graph_path("encoder"))
    rows = []
    with torch.no_grad():
        for case in enc_cases:
            src = make_sources(cfg, case.lengths, rng)
            want = [t.numpy() for t in encoder(torch.from_numpy(src))]
            got = enc_sess.run(enc_spec.output_names, {"src_tokens": src})
            for name, g, w in zip(enc_spec.output_names, got, want):
                rows.append({"graph": "encoder", "case": case.name} | compare(name, g, w))
        if not cfg.is_encoder_decoder:
            return rows
        del enc_sess  # its mapped weights: the step's check does not need them
        k = artifact.topk
        for graph in [g for g in ("decoder_step", SHORTLIST_STEP) if g in artifact.manifest.graphs]:
            rows += _step_parity(model, encoder, artifact, graph, k, step_cases, rng)
    return rows


def step_case_feeds(
    cfg, case: StepCase, cross: list[np.ndarray], padding: np.ndarray, k: int, rng, candidates: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Feeds of the step graph for ``case``: rows at random positions over a random cache, a
    forced token, banned and only-eos rows, unk penalties, scored ids and the full log-probs (as
    float32; an fp16 graph's caller casts its float inputs)."""
    n = len(case.lengths) * case.group
    positions = rng.integers(0, case.cache_len + 1, size=n).astype(np.int64)
    forced = np.full(n, -1, dtype=np.int64)
    forced[-1] = 5 % cfg.vocab_size
    feeds = {
        "tokens": rng.integers(4, cfg.vocab_size, size=(n, case.new_len)).astype(np.int64),
        "positions": positions,
        "src_padding": padding,
        "forced_tokens": forced,
        "ban_eos": np.arange(n) % 3 == 1,
        "only_eos": (np.arange(n) % 4 == 2) & (forced < 0),
        "unk_penalty": (np.arange(n) % 2 * 0.5).astype(np.float32),
        "score_ids": rng.integers(0, cfg.vocab_size, size=(n, case.new_len, 3)).astype(np.int64),
        "want_log_probs": np.array(True),
    }
    for i in range(cfg.decoder_layers):
        for name in cache_names(i):
            feeds[name] = rng.standard_normal((n, cfg.heads, case.cache_len, cfg.head_dim)).astype(np.float32)
    feeds |= dict(zip(per_layer(cfg, cross_names), cross, strict=True))
    if candidates is not None:
        feeds["candidates"] = candidates
    return feeds


def _step_parity(model, encoder, artifact, graph: str, k: int, step_cases, rng) -> list[dict]:
    """One step graph, ORT against the PyTorch step, per case. The shortlist step gets a random
    third of the vocabulary as candidates (eos, unk and the forced token among them) in fp32,
    where every output must match; in fp16 / int8 it gets the whole vocabulary, so that its
    top-1 verdict is taken on the same distributions as the full step's (on a third of a random
    model's near-flat vocabulary, a handful of rows decide the share)."""
    cfg = model.cfg
    shortlist = graph == SHORTLIST_STEP
    step = DecoderStepGraph(model, k, shortlist=shortlist).eval()
    spec: GraphSpec = artifact.graph_spec(graph)
    step_sess = _ort_session(artifact.graph_path(graph))
    float_dtype = np.dtype(spec.outputs[-1].dtype)
    rows = []
    with torch.no_grad():
        for case in step_cases:
            src = make_sources(cfg, case.lengths, rng)
            cross = [t.numpy() for t in encoder(torch.from_numpy(src))[1:]]
            candidates = None
            if shortlist and artifact.precision == "fp32":
                third = rng.choice(cfg.vocab_size, size=max(k + RULES_MARGIN, cfg.vocab_size // 3), replace=False)
                candidates = np.union1d(third, [cfg.eos, cfg.unk, 5 % cfg.vocab_size]).astype(np.int64)
            elif shortlist:
                candidates = np.arange(cfg.vocab_size, dtype=np.int64)
            feeds = step_case_feeds(cfg, case, cross, src == cfg.pad, k, rng, candidates)
            want = [
                t.numpy() for t in step(*step.inputs({k: torch.from_numpy(np.asarray(a)) for k, a in feeds.items()}))
            ]
            for tspec in spec.inputs:
                if tspec.dtype == "float16":
                    feeds[tspec.name] = feeds[tspec.name].astype(float_dtype)
            got = step_sess.run(spec.output_names, feeds)
            finite = np.isfinite(want[0])  # ids of -inf scores (banned tokens) are arbitrary ties
            for name, g, w in zip(spec.output_names, got, want):
                row = compare(name, g, w)
                if name == "topk_ids":
                    row = compare(name, np.where(finite, g, -1), np.where(finite, w, -1))
                    if row.get("shape_ok"):
                        row |= decisive_top1(
                            g.reshape(-1, g.shape[-1]),
                            w.reshape(-1, w.shape[-1]),
                            want[0].reshape(-1, want[0].shape[-1]),
                        )
                rows.append({"graph": graph, "case": case.name} | row)
    return rows


E2E_BATCHES = (1, 3, 4)  # sentences per batch of the end-to-end translations (8 in all)
TEACHER_FORCED_STEPS = 20  # tokens of the teacher-forced check (every sentence of the text)


def end_to_end_checks(model, artifact, text: ParityText | None = None, seed: int = 0) -> tuple[list[dict], dict]:
    """Translate the same sources with --backend torch and --backend ort (greedy and beam 5): per
    beam, the fraction of sentences with identical ids and the largest score difference; then
    every sentence decoded greedily for TEACHER_FORCED_STEPS tokens, both backends fed the
    reference's tokens (``compare_steps``): the top-1 agreement at every (sentence, step), over
    all of them and over the decisive ones. Sources: ``text``'s first sentences in batches of
    E2E_BATCHES (the teacher-forced check takes them all), else a few random ids. Returns
    (rows per beam, the teacher-forced result)."""
    from deltalm.backends.ort import OrtBackend
    from deltalm.compare import compare_steps

    from .torch_backend import TorchBackend

    cfg = model.cfg
    if text is not None:
        sentences, sources, at = list(text.sentences), [], 0
        for size in E2E_BATCHES:
            sources.append(collate([sentences[(at + i) % len(sentences)] for i in range(size)], cfg.pad))
            at += size
        everything = collate(text.sentences, cfg.pad)
    else:
        # a few sentences of varied lengths, left-padded; kept small because the PyTorch reference
        # is slow on full-size models (it is the baseline, after all)
        rng = np.random.default_rng(seed)
        sources = [make_sources(cfg, lengths, rng) for lengths in [(5, 9, 3), (12,)]]
        everything = collate([list(row[row != cfg.pad]) for src in sources for row in src], cfg.pad)
    turns = take_turns(model, artifact)
    ref = _TurnBackend(TorchBackend(model, topk=artifact.topk), turns, "torch")
    with _backend_sessions_for_check(artifact.precision):
        candidate = _TurnBackend(OrtBackend(artifact), turns, "ort")
    rows = compare_translations(ref, candidate, sources, beams=(1, 5), max_len_b=16)
    return rows, compare_steps(ref, candidate, everything, TEACHER_FORCED_STEPS)


def end_to_end(
    model, artifact, sources: list[np.ndarray] | None = None, seed: int = 0, text: ParityText | None = None
) -> list[dict]:
    """The per-beam rows of ``end_to_end_checks`` (identical ids, score difference); with
    ``sources`` (a list of left-padded batches), on those."""
    if sources is None:
        return end_to_end_checks(model, artifact, text, seed)[0]
    from deltalm.backends.ort import OrtBackend

    from .torch_backend import TorchBackend

    ref = TorchBackend(model, topk=artifact.topk)
    with _backend_sessions_for_check(artifact.precision):
        candidate = OrtBackend(artifact)
    return compare_translations(ref, candidate, sources, beams=(1, 5), max_len_b=16)


FLOAT_OUTPUTS = ("log_probs", "topk_scores", "token_scores", "encoder_out", "mlm_logits")


def pooled_top1(rows: list[dict]) -> dict[str, dict]:
    """Per graph, the decisive top-1 agreement of its top-k ids pooled over all its cases:
    {graph: {"decisive_rows", "decisive_top1_agreement"}} (graphs with top-k outputs only)."""
    pooled: dict[str, list[float]] = {}
    for r in rows:
        if r["output"] == "topk_ids" and "decisive_rows" in r:
            n, agree = pooled.setdefault(r["graph"], [0, 0.0])
            pooled[r["graph"]] = [n + r["decisive_rows"], agree + r["decisive_rows"] * r["decisive_top1_agreement"]]
    return {
        g: {"decisive_rows": n, "decisive_top1_agreement": agree / n if n else 1.0} for g, (n, agree) in pooled.items()
    }


def summarize(
    rows: list[dict],
    precision: str,
    tolerance: float | None,
    end_to_end_rows: list[dict] = (),
    teacher_forced: dict | None = None,
) -> tuple[bool, list[str]]:
    """The verdict (``deltalm.compare.Thresholds.for_precision``). Every shape must be right.
    fp32: every float output within ``tolerance`` (max abs). Each graph's top-k top-1, pooled
    over its cases (``pooled_top1``), at least ``min_graph_top1``. End to end: the teacher-forced
    decisive top-1 at least ``min_top1``, the share of identical sentences at least
    ``min_identical``."""
    limits = Thresholds.for_precision(precision, tolerance)
    graph_limits = dataclasses.replace(limits, min_top1=limits.min_graph_top1)
    failures = []
    for r in rows:
        what = f"{r['graph']} {r['output']} [{r['case']}]"
        if not r.get("shape_ok", False):
            failures += limits.failures(what, r)
        elif r["output"] in FLOAT_OUTPUTS and "max_abs" in r:
            failures += limits.failures(what, r)
    for graph, pooled in pooled_top1(rows).items():
        failures += graph_limits.failures(
            f"{graph} topk_ids (all cases, {pooled['decisive_rows']} decisive rows)", pooled
        )
    for r in end_to_end_rows:
        failures += limits.failures(f"end to end, beam {r['beam']}", r)
    if teacher_forced is not None:
        t = teacher_forced
        failures += limits.failures(
            f"end to end, teacher-forced ({t['decisive_rows']} decisive of {t['rows']} sentences x {t['steps']} steps)",
            t,
        )
    return not failures, failures


TABLE_LEGEND = (
    "  max_abs / max_rel: largest absolute / relative difference between ONNX Runtime and PyTorch. The verdict",
    "  reads max_abs of the float outputs (log_probs, topk_scores, encoder_out, mlm_logits) against the tolerance;",
    "  max_rel is for information (large where values are near 0), and so are the K/V rows (worst layer).",
    "  ids/top1: the share of the in-graph top-k ids equal to PyTorch's / of rows whose best id agrees.",
)


def format_summary(rows: list[dict], report: Path | None, verbose: bool) -> str:
    """One line: how much was compared and the largest differences; where the table is."""
    checked = [r for r in rows if r.get("shape_ok", False)]
    floats = [r for r in checked if r["output"] in FLOAT_OUTPUTS and "max_abs" in r]
    ids = [r for r in checked if "agreement" in r]
    parts = [f"{len(rows)} outputs compared over {len({(r['graph'], r['case']) for r in rows})} graph cases"]
    if floats:
        worst = max(floats, key=lambda r: r["max_abs"])
        parts.append(f"largest difference {worst['max_abs']:.1e} ({worst['graph']} {worst['output']})")
    if ids:
        parts.append(
            f"top-k ids equal >= {min(r['agreement'] for r in ids):.0%}, best id agrees >= "
            f"{min(r['top1_agreement'] for r in ids):.0%}"
        )
    if not verbose:
        parts.append(
            f"every output and case in {report} (--verbose prints the table)"
            if report is not None
            else "--verbose prints every output and case"
        )
    return "parity summary: " + "; ".join(parts)


def format_table(rows: list[dict]) -> str:
    """One line per graph output and case; the K/V outputs of all layers are folded into one line
    (their worst error). parity.json keeps every output."""
    folded: dict[tuple, dict] = {}
    for r in rows:
        out = r["output"]
        for prefix in ("new_", "cross_"):
            if out.startswith(prefix):
                out = prefix + "kv (all layers)"
        key = (r["graph"], r["case"], out)
        if key in folded and "max_abs" in r and "max_abs" in folded[key]:
            prev = folded[key]
            folded[key] = prev | {
                "max_abs": max(prev["max_abs"], r["max_abs"]),
                "max_rel": max(prev["max_rel"], r["max_rel"]),
            }
        elif key not in folded or not r.get("shape_ok", False):
            folded[key] = r | {"output": out}
    lines = [
        f"{'graph':<22} {'output':<22} {'case':<48} {'max_abs':>10} {'max_rel':>10} {'ids/top1':>10}",
        *TABLE_LEGEND,
    ]
    for r in folded.values():
        if not r.get("shape_ok", False):
            tail = "SHAPE MISMATCH"
        elif "max_abs" in r:
            tail = f"{r['max_abs']:>10.2e} {r['max_rel']:>10.2e}"
        else:
            tail = f"{'':>10} {'':>10} {r['agreement']:>4.2f}/{r['top1_agreement']:.2f}"
        lines.append(f"{r['graph']:<22} {r['output']:<22} {r['case'][:48]:<48} {tail}")
    return "\n".join(lines)
