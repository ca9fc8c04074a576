"""``deltalm.Translator``: a model opened once, translating lists or streams of sentences.

    import deltalm

    with deltalm.Translator("demo/artifact", threads=2) as translator:
        [result] = translator.translate_batch(["Die Katze sieht den roten Apfel."], beam=5)
        print(result.text, result.hypotheses[0].tokens, result.hypotheses[0].score)

Sentences are tokenized (sentencepiece + fairseq dictionary), sorted by source length, cut into
batches by sentence count and / or padded tokens, decoded with the one search loop
(``deltalm.search``, fairseq's SequenceGenerator semantics) and returned in input order: exactly one
``Translation`` per input sentence. Beam search and greedy decoding give the same result for a
sentence whatever it is batched with; sampling with a seed depends on the batch (as in fairseq).

Thread safety: a Translator may be shared by threads; its calls are serialized by a lock (a backend
runs one batch at a time with all of its threads). For parallel decoding open one Translator per
worker, each with its share of the cores.

Scores are natural logarithms (fairseq's ``generate`` prints base 2 in its H-/P- lines: divide by
ln 2 to compare). Line numbers in messages are 1-based; ``Translation.index`` is 0-based.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .artifact import MANIFEST, read_manifest, verify_files
from .atomic import previous_artifact_of
from .backends import BACKENDS, load_backend
from .errors import DeltaLMError, InputError
from .search import SearchOptions, generate
from .shortlist import Shortlist
from .tokenizer import Tokenizer

DEFAULT_BATCH_SIZE = 32
DEFAULT_CHUNK_LINES = 2000


class OptionError(InputError):
    """A translation option with a value it cannot take. ``option`` is its keyword name (as in
    ``translate_batch`` and the HTTP API); the command line shows it as ``--option-name``."""

    def __init__(self, option: str, reason: str):
        self.option, self.reason = option, reason
        super().__init__(f"{option} {reason}")


# --- options --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranslateOptions:
    """What to search for, per call. Hashable: requests with equal options can share batches."""

    beam: int = 5  # beam size; with sampling, samples per sentence
    nbest: int = 1  # hypotheses returned per sentence, best first
    lenpen: float = 1.0  # score = sum of log-probs / length ** lenpen
    max_len_a: float = 0.0  # max length = max_len_a * source width + max_len_b
    max_len_b: int = 200
    min_len: int = 1  # </s> banned before this many tokens
    unkpen: float = 0.0  # subtracted from <unk>'s log-prob
    no_repeat_ngram_size: int = 0  # ban repeated n-grams of this size
    sampling: bool = False
    temperature: float = 1.0
    sampling_topk: int = -1  # sample from the k most likely tokens (-1: all)
    sampling_topp: float = -1.0  # sample from the nucleus of mass p (-1: all)
    seed: int | None = None  # random seed of sampling
    src_prefix: tuple[str, ...] | None = None  # forced source prefix symbols; None: the translator's
    tgt_prefix: tuple[str, ...] | None = None  # forced target prefix symbols (removed from the text); None: the translator's
    truncate: bool = False  # cut sources longer than the model's positions instead of failing

    @classmethod
    def from_mapping(cls, values: dict) -> "TranslateOptions":
        """Options from a JSON-like mapping, each value checked for its type (``OptionError``
        naming the option). Unknown names are refused."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise OptionError(unknown[0], f"is not an option (options: {', '.join(fields)})")
        checked = {}
        for name, value in values.items():
            default = fields[name].default
            if name in ("src_prefix", "tgt_prefix"):
                if value is None:
                    checked[name] = None
                    continue
                if isinstance(value, str):
                    value = value.split()
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise OptionError(name, "must be a list of dictionary symbols")
                checked[name] = tuple(value)
            elif name == "seed":
                if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                    raise OptionError(name, f"must be an integer, got {value!r}")
                checked[name] = value
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise OptionError(name, f"must be true or false, got {value!r}")
                checked[name] = value
            elif isinstance(default, int):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise OptionError(name, f"must be an integer, got {value!r}")
                checked[name] = value
            else:  # float
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise OptionError(name, f"must be a number, got {value!r}")
                checked[name] = float(value)
        opts = cls(**checked)
        opts.validate()
        return opts

    def replace(self, **changes) -> "TranslateOptions":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Every check that needs no model; raises ``OptionError``."""
        for name in ("lenpen", "unkpen", "max_len_a", "temperature", "sampling_topp"):
            if not math.isfinite(getattr(self, name)):  # float("nan") and float("inf") parse
                raise OptionError(name, f"must be a finite number, got {getattr(self, name)}")
        if self.beam < 1:
            raise OptionError("beam", f"must be >= 1, got {self.beam}")
        if not 1 <= self.nbest <= self.beam:
            raise OptionError("nbest", f"must be between 1 and beam ({self.beam}), got {self.nbest}")
        if self.max_len_a < 0:
            raise OptionError("max_len_a", f"must be >= 0, got {self.max_len_a}")
        if self.max_len_b < 0:
            raise OptionError("max_len_b", f"must be >= 0, got {self.max_len_b}")
        if self.min_len < 0:
            raise OptionError("min_len", f"must be >= 0, got {self.min_len}")
        if self.max_len_a == 0 and self.min_len > self.max_len_b:
            raise OptionError("min_len", f"{self.min_len} exceeds max_len_b {self.max_len_b}")
        if self.temperature <= 0:
            raise OptionError("temperature", f"must be > 0, got {self.temperature}")
        if self.no_repeat_ngram_size < 0:
            raise OptionError("no_repeat_ngram_size", f"must be >= 0, got {self.no_repeat_ngram_size}")
        if not self.sampling and (self.sampling_topk != -1 or self.sampling_topp != -1.0):
            name = "sampling_topk" if self.sampling_topk != -1 else "sampling_topp"
            raise OptionError(name, "applies only with sampling")
        if self.sampling_topk != -1 and self.sampling_topp != -1.0:
            raise OptionError("sampling_topk", "and sampling_topp: give one, not both")
        if self.sampling_topk != -1 and self.sampling_topk < 1:
            raise OptionError("sampling_topk", f"must be >= 1 (or -1 for no limit), got {self.sampling_topk}")
        if self.sampling_topp != -1.0 and not 0 < self.sampling_topp <= 1:
            raise OptionError("sampling_topp", f"must be in (0, 1], got {self.sampling_topp}")

    def search_options(self, prefix_tokens: list[int]) -> SearchOptions:
        return SearchOptions(
            beam=self.beam, nbest=self.nbest, max_len_a=self.max_len_a, max_len_b=self.max_len_b,
            min_len=self.min_len, lenpen=self.lenpen, unkpen=self.unkpen,
            no_repeat_ngram_size=self.no_repeat_ngram_size, sampling=self.sampling,
            temperature=self.temperature, sampling_topk=self.sampling_topk, sampling_topp=self.sampling_topp,
            seed=self.seed, prefix_tokens=list(prefix_tokens),
        )


@dataclass(frozen=True)
class BatchOptions:
    """How sentences are grouped for the backend (the results do not depend on it, except with
    sampling)."""

    batch_size: int | None = DEFAULT_BATCH_SIZE  # sentences per batch; None: only max_tokens limits
    max_tokens: int | None = None  # padded source width x rows per batch

    def validate(self) -> None:
        if self.batch_size is None and self.max_tokens is None:
            raise OptionError("batch_size", "or max_tokens must be given")
        if self.batch_size is not None and self.batch_size < 1:
            raise OptionError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise OptionError("max_tokens", f"must be >= 1, got {self.max_tokens}")


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hypothesis:
    text: str  # detokenized, forced target prefix removed
    tokens: list[int]  # fairseq dictionary ids, final </s> included (and the target prefix, if any)
    score: float  # sum of token log-probs (natural log) / len(tokens) ** lenpen
    positional_scores: list[float]  # log-prob of each token


@dataclass(frozen=True)
class Translation:
    """The result for one input sentence."""

    index: int  # 0-based position of the sentence in the input
    hypotheses: list[Hypothesis] = field(default_factory=list)  # n-best, best first; [] for an empty line

    @property
    def text(self) -> str:
        return self.hypotheses[0].text if self.hypotheses else ""

    def to_dict(self) -> dict:
        """The record of ``deltalm translate --format jsonl`` (also the HTTP API's result) as a
        dict: -inf / NaN scores become None (null), so that strict JSON readers accept every line."""
        return {
            "id": self.index,
            "nbest": [
                {"tokens": list(h.tokens), "score": _json_float(h.score),
                 "positional_scores": [_json_float(s) for s in h.positional_scores], "text": h.text}
                for h in self.hypotheses
            ],
        }


    def to_json(self) -> str:
        """The record as the one line of JSON ``deltalm translate --format jsonl`` writes."""
        return json.dumps(self.to_dict(), ensure_ascii=False)


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def format_translation(t: Translation, fmt: str) -> str:
    """One output line (``fmt`` "text" or "jsonl"), without its newline."""
    if fmt == "jsonl":
        return t.to_json()
    return t.text


def _warn_stderr(message: str) -> None:
    print(f"deltalm: warning: {message}", file=sys.stderr, flush=True)


# --- the translator -------------------------------------------------------------------------------


class Translator:
    """A DeltaLM opened once.

    ``model``: an artifact directory (``deltalm export``), run with ``backend`` "ort" (default),
    "trt" (TensorRT engines, ``device`` "cuda") or "torch" (the PyTorch model rebuilt from the
    checkpoint the manifest names); or a checkpoint file, run with the torch backend, which then
    needs ``spm`` and ``dictionary`` (and ``config`` to override its architecture).
    ``device``: "cpu" or "cuda" (ort, trt); ``threads``: CPU threads of the backend.
    ``src_prefix`` / ``tgt_prefix``: source / forced target prefix symbols (e.g. language tags)
    for every sentence, unless a call gives its own; unknown symbols fail here, before the backend
    loads. ``warn``: where warnings go (a truncated sentence...); stderr by default.
    ``shortlist``: a vocabulary shortlist (a file of ``deltalm shortlist``, or a ``Shortlist``):
    every step scores only the batch's candidates (faster, approximate; ort backend only, and the
    artifact's ``decoder_step_shortlist`` graph is loaded instead of the full step).
    """

    def __init__(
        self,
        model: str | Path,
        backend: str | None = None,
        device: str | None = None,
        threads: int | None = None,
        *,
        spm: str | Path | None = None,
        dictionary: str | Path | None = None,
        config: str | None = None,
        src_prefix: Sequence[str] | None = None,
        tgt_prefix: Sequence[str] | None = None,
        warn: Callable[[str], None] = _warn_stderr,
        shortlist: str | Path | Shortlist | None = None,
    ) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise OptionError("threads", f"must be >= 1, got {threads}")
        self.shortlist = Shortlist.load(shortlist) if isinstance(shortlist, (str, Path)) else shortlist
        self._lock = threading.Lock()
        self._warn = warn
        self.backend_name, self.device, kind = _resolve(Path(model), backend, device, spm, dictionary, config)
        self.model_path = Path(model)
        if self.shortlist is not None and (kind != "artifact" or self.backend_name != "ort"):
            raise OptionError("shortlist", "runs on an artifact with the ort backend")
        if kind == "checkpoint":
            self.tokenizer = Tokenizer(spm, dictionary, list(src_prefix or []))
            self.tgt_prefix = self.tokenizer.encode_target_prefix(tgt_prefix or [])
            self._backend = load_backend("torch", str(model), config=config, dict_path=str(dictionary), threads=threads)
        else:
            # The manifest first (cheap): a newer format, an unfinished export or a directory that
            # is no artifact at all is reported as such, not as a missing tokenizer file.
            directory = Path(model)
            spm_path, dict_path = directory / "spm.model", directory / "dict.txt"
            if (directory / MANIFEST).exists() or not spm_path.exists():
                manifest = read_manifest(directory)
                names = manifest.tokenizer
                spm_path, dict_path = directory / names.get("spm", "spm.model"), directory / names.get("dict", "dict.txt")
                verify_files(directory, manifest, [spm_path.name, dict_path.name])
            self.tokenizer = Tokenizer(spm_path, dict_path, list(src_prefix or []))
            self.tgt_prefix = self.tokenizer.encode_target_prefix(tgt_prefix or [])
            if self.shortlist is not None:
                self.shortlist.check_dictionary(dict_path, len(self.tokenizer))
                self._backend = load_backend("ort", directory, device=self.device, threads=threads, shortlist=True)
            else:
                self._backend = load_backend(self.backend_name, directory, device=self.device, threads=threads)
        self.config = self._backend.cfg
        _check_vocabulary(self.config, self.tokenizer)

    @classmethod
    def from_backend(cls, backend, tokenizer: Tokenizer, tgt_prefix: Sequence[str] | None = None,
                     warn: Callable[[str], None] = _warn_stderr) -> "Translator":
        """A Translator over a backend object of your own (anything with ``cfg``, ``encode`` and
        ``step``, see ``deltalm.backends``) and a tokenizer."""
        self = cls.__new__(cls)
        self._lock = threading.Lock()
        self._warn = warn
        self.backend_name, self.device, self.model_path = type(backend).__name__, None, None
        self.tokenizer, self._backend, self.config = tokenizer, backend, backend.cfg
        self.tgt_prefix = tokenizer.encode_target_prefix(tgt_prefix or [])
        self.shortlist = None
        _check_vocabulary(self.config, tokenizer)
        return self

    # -- properties
    @property
    def topk(self) -> int:
        """k of the backend's in-graph top-k: beams up to k // 2 take the fast path."""
        return int(getattr(self._backend, "topk", 0))

    @property
    def max_target_len(self) -> int | None:
        """The longest target a TensorRT engine's profile allows (None: the model's positions)."""
        return getattr(self._backend, "max_target_len", None)

    # -- life cycle
    def close(self) -> None:
        """Releases the backend (sessions, engines, device memory). Idempotent."""
        with self._lock:
            backend, self._backend = getattr(self, "_backend", None), None
        if backend is not None and hasattr(backend, "close"):
            backend.close()

    def __enter__(self) -> "Translator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- translation
    def translate_batch(
        self,
        sentences: Sequence[str],
        *,
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        max_tokens: int | None = None,
        **options,
    ) -> list[Translation]:
        """One ``Translation`` per sentence, in input order. ``options`` are the fields of
        ``TranslateOptions`` (beam, nbest, lenpen, max_len_a, max_len_b, min_len, unkpen,
        no_repeat_ngram_size, sampling, temperature, sampling_topk, sampling_topp, seed,
        src_prefix, tgt_prefix, truncate). ``batch_size`` / ``max_tokens`` limit each batch given
        to the backend. Bad options raise ``OptionError`` before anything is decoded; a failing
        sentence raises a DeltaLMError naming its position (1-based)."""
        if isinstance(sentences, (str, bytes)):
            raise InputError("translate_batch takes a list of sentences, not one string")
        opts = _options(options)
        batching = BatchOptions(batch_size, max_tokens)
        batching.validate()
        return self._translate(list(sentences), 0, opts, batching, "strict")

    def translate_iterable(
        self,
        lines: Iterable[str | bytes],
        *,
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        max_tokens: int | None = None,
        chunk_lines: int = DEFAULT_CHUNK_LINES,
        errors: str = "strict",
        **options,
    ) -> Iterator[Translation]:
        """Translations of ``lines`` in order, produced lazily: ``chunk_lines`` lines are read,
        sorted by length, batched and translated at a time (1 for interactive use: each line is
        answered before the next is read). Lines may be str or UTF-8 bytes (``errors``: "strict"
        fails on invalid UTF-8, "replace" decodes it with U+FFFD); a trailing newline is ignored
        and an empty line gives a Translation with no hypotheses. Options are checked at the
        call, before any line is read."""
        if not isinstance(chunk_lines, int) or chunk_lines < 1:
            raise OptionError("chunk_lines", f"must be >= 1, got {chunk_lines}")
        lines = iter(lines)
        chunks = iter(lambda: list(itertools.islice(lines, chunk_lines)), [])
        return self.translate_chunks(chunks, batch_size=batch_size, max_tokens=max_tokens, errors=errors, **options)

    def translate_chunks(
        self,
        chunks: Iterable[Sequence[str | bytes]],
        *,
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        max_tokens: int | None = None,
        errors: str = "strict",
        **options,
    ) -> Iterator[Translation]:
        """As ``translate_iterable``, with the grouping chosen by the caller: each element of
        ``chunks`` is a list of lines sorted and batched together (e.g. the lines a pipe had
        ready), and its translations are yielded before the next chunk is read. Indices run on
        across chunks."""
        opts = _options(options)
        batching = BatchOptions(batch_size, max_tokens)
        batching.validate()
        if errors not in ("strict", "replace"):
            raise OptionError("errors", f"must be strict or replace, got {errors!r}")
        with self._lock:
            self._prefixes(opts)  # unknown prefix symbols fail now, not at the first line
        return self._stream(iter(chunks), opts, batching, errors)

    def _stream(self, chunks: Iterator, opts, batching, errors: str) -> Iterator[Translation]:
        start = 0
        for chunk in chunks:
            chunk = list(chunk)
            yield from self._translate(chunk, start, opts, batching, errors)
            start += len(chunk)

    def _prefixes(self, opts: TranslateOptions) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        src = tok.src_prefix if opts.src_prefix is None else tok.encode_source_prefix(opts.src_prefix)
        tgt = self.tgt_prefix if opts.tgt_prefix is None else tok.encode_target_prefix(opts.tgt_prefix)
        return src, tgt

    def _translate(self, chunk: list, start: int, opts: TranslateOptions, batching: BatchOptions,
                   errors: str) -> list[Translation]:
        with self._lock:
            backend = self._backend
            if backend is None:
                raise InputError("this Translator is closed")
            src_prefix, tgt_prefix = self._prefixes(opts)
            search = opts.search_options(tgt_prefix)
            _check_model(backend, self.tokenizer, search, src_prefix)
            return _translate_chunk(backend, self.tokenizer, chunk, start, search, src_prefix, opts.truncate,
                                    batching, errors, self._warn, self.shortlist)


def _options(options: dict) -> TranslateOptions:
    try:
        opts = TranslateOptions(**options)
    except TypeError as e:
        known = ", ".join(f.name for f in dataclasses.fields(TranslateOptions))
        raise InputError(f"{e}; translation options are: {known}") from None
    if opts.src_prefix is not None and not isinstance(opts.src_prefix, tuple):
        opts = opts.replace(src_prefix=tuple(opts.src_prefix))
    if opts.tgt_prefix is not None and not isinstance(opts.tgt_prefix, tuple):
        opts = opts.replace(tgt_prefix=tuple(opts.tgt_prefix))
    opts.validate()
    return opts


def _resolve(model: Path, backend, device, spm, dictionary, config) -> tuple[str, str | None, str]:
    """(backend, device, "artifact" | "checkpoint") for the arguments, every contradiction an
    InputError before anything is loaded."""
    if backend is not None and backend not in BACKENDS:
        raise OptionError("backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if model.is_file():
        missing = [name for name, v in (("spm", spm), ("dictionary", dictionary)) if not v]
        if missing:
            raise InputError(
                f"{model} is a checkpoint file: translating it needs {' and '.join(missing)} (the torch "
                f"backend), or export it to an artifact directory first (`deltalm export {model} --spm SPM "
                f"--dict DICT --out DIR`)"
            )
        backend = backend or "torch"
        if backend != "torch":
            raise InputError(f"the {backend} backend runs an artifact directory; a checkpoint runs with the torch backend")
        if device not in (None, "cpu"):
            raise InputError("the torch backend runs on the CPU here; use the ort or trt backend for a GPU")
        return "torch", "cpu", "checkpoint"
    if not model.exists():
        kept = previous_artifact_of(model)
        hint = f" (an interrupted export left the previous artifact in {kept}: rename it back)" if kept else ""
        raise InputError(f"artifact directory {model} does not exist{hint}")
    if spm or dictionary or config:
        raise InputError("spm, dictionary and config go with a checkpoint file; an artifact directory has its own")
    backend = backend or "ort"
    if backend == "torch":
        if device not in (None, "cpu"):
            raise InputError("the torch backend runs on the CPU here; use the ort or trt backend for a GPU")
        return "torch", "cpu", "artifact"
    device = device or ("cuda" if backend == "trt" else "cpu")
    if device not in ("cpu", "cuda"):
        raise OptionError("device", f"must be cpu or cuda, got {device!r}")
    if backend == "trt" and device != "cuda":
        raise InputError("the trt backend runs on device cuda only")
    return backend, device, "artifact"


def _check_vocabulary(cfg, tokenizer: Tokenizer) -> None:
    if len(tokenizer) > cfg.vocab_size:
        raise InputError(
            f"the dictionary has {len(tokenizer)} symbols but the model's vocabulary only "
            f"{cfg.vocab_size}: {tokenizer.dict_path} does not belong to this model"
        )


def _check_model(backend, tokenizer: Tokenizer, search: SearchOptions, src_prefix: list[int]) -> None:
    """What the model must allow for every sentence of a call."""
    cfg = backend.cfg
    if search.beam >= cfg.vocab_size:
        raise OptionError("beam", f"{search.beam} must be smaller than the vocabulary ({cfg.vocab_size})")
    if len(src_prefix) + 2 > cfg.max_positions:
        raise InputError(
            f"the source prefix ({len(src_prefix)} tokens) leaves no room for text in the "
            f"model's {cfg.max_positions} source positions"
        )
    if search.min_len > cfg.max_positions - 1:
        raise OptionError("min_len", f"{search.min_len} exceeds the model's maximum length {cfg.max_positions - 1}")
    limit = getattr(backend, "max_target_len", None)  # TensorRT: the engine profile's past_len maximum
    if limit is not None and search.max_len_a == 0 and min(search.max_len_b, cfg.max_positions - 1) > limit:
        raise OptionError(
            "max_len_b",
            f"{search.max_len_b} exceeds the {limit} target tokens the TensorRT engines were built for; "
            f"pass {limit} or rebuild them with `deltalm engines DIR --max-tgt-len ...`",
        )


def _decode_line(raw: str | bytes, index: int, errors: str) -> str:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8", errors=errors)
        except UnicodeDecodeError as e:
            raise InputError(
                f"input line {index + 1} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                f"{e.start + 1}); pass --errors replace to translate it with U+FFFD for bad bytes"
            ) from None
    elif isinstance(raw, str):
        text = raw
    else:
        raise InputError(f"input line {index + 1} is a {type(raw).__name__}, not text")
    text = text.removesuffix("\n").removesuffix("\r")
    if index == 0:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark is not text
    return text


def _translate_chunk(backend, tokenizer: Tokenizer, chunk: list, start: int, search: SearchOptions,
                     src_prefix: list[int], truncate: bool, batching: BatchOptions, errors: str,
                     warn: Callable[[str], None], shortlist: Shortlist | None = None) -> list[Translation]:
    max_src = backend.cfg.max_positions  # source tokens, source prefix and </s> included
    bare = len(src_prefix) + 1  # length of a source with no text
    results: list[Translation | None] = [None] * len(chunk)
    sources: list[tuple[int, list[int]]] = []  # (position in chunk, ids)
    for k, raw in enumerate(chunk):
        line_no = start + k + 1
        try:
            ids = tokenizer.encode(_decode_line(raw, start + k, errors), src_prefix)
        except DeltaLMError as e:
            if str(e).startswith("input line"):
                raise
            raise type(e)(f"input line {line_no}: {e}") from None
        if len(ids) == bare:  # nothing sentencepiece keeps (empty / blank line): nothing to decode
            results[k] = Translation(start + k)
            continue
        if len(ids) > max_src:
            if not truncate:
                raise InputError(
                    f"input line {line_no} has {len(ids)} source tokens (with </s> and the source "
                    f"prefix); the model takes at most {max_src}. Pass --truncate to cut it"
                )
            warn(f"input line {line_no}: {len(ids)} source tokens, truncated to the model's {max_src}")
            ids = ids[: max_src - 1] + [tokenizer.eos]
        if batching.max_tokens is not None and len(ids) > batching.max_tokens:
            raise InputError(
                f"input line {line_no} has {len(ids)} source tokens, more than --max-tokens {batching.max_tokens}"
            )
        sources.append((k, ids))

    prefix = list(search.prefix_tokens)
    by_length = sorted(sources, key=lambda s: (-len(s[1]), s[0]))
    for batch in make_batches(by_length, batching.batch_size, batching.max_tokens):
        try:
            nbest = generate(backend, tokenizer.collate([ids for _, ids in batch]), search, shortlist)
            for (k, _), hyps in zip(batch, nbest):
                results[k] = Translation(start + k, [
                    Hypothesis(_hypothesis_text(tokenizer, h.tokens, prefix), list(h.tokens), float(h.score),
                               [float(s) for s in h.positional_scores])
                    for h in hyps
                ])
        except Exception as e:
            raise _batch_error(e, sorted(start + k + 1 for k, _ in batch)) from e
    return results  # type: ignore[return-value]  # every slot is filled above


def make_batches(
    items: list[tuple[int, list[int]]], batch_size: int | None, max_tokens: int | None
) -> list[list[tuple[int, list[int]]]]:
    """Cut ``items`` (in their order) into batches of at most ``batch_size`` rows and at most
    ``max_tokens`` padded tokens (rows x longest source); a None limit does not apply."""
    batches: list[list[tuple[int, list[int]]]] = []
    current: list[tuple[int, list[int]]] = []
    width = 0
    for item in items:
        w = max(width, len(item[1]))
        full = (batch_size is not None and len(current) + 1 > batch_size) or (
            max_tokens is not None and w * (len(current) + 1) > max_tokens
        )
        if current and full:
            batches.append(current)
            current, w = [], len(item[1])
        current.append(item)
        width = w
    if current:
        batches.append(current)
    return batches


def _hypothesis_text(tokenizer: Tokenizer, tokens: list[int], prefix: list[int]) -> str:
    if prefix and tokens[: len(prefix)] == prefix:
        tokens = tokens[len(prefix) :]
    return tokenizer.decode(tokens)


def _line_ranges(numbers: list[int], limit: int = 12) -> str:
    """[3, 4, 5, 9] -> "3-5, 9" (at most ``limit`` ranges shown)."""
    ranges: list[str] = []
    for _, group in itertools.groupby(enumerate(numbers), key=lambda p: p[1] - p[0]):
        run = [n for _, n in group]
        ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    shown = ", ".join(ranges[:limit])
    return shown if len(ranges) <= limit else f"{shown}, ... ({len(numbers)} lines)"


def _batch_error(e: Exception, line_numbers: list[int]) -> DeltaLMError:
    where = f"input line{'s' if len(line_numbers) > 1 else ''} {_line_ranges(line_numbers)}"
    if isinstance(e, DeltaLMError):
        try:
            return type(e)(f"{where}: {e}")
        except TypeError:  # a subclass with another constructor
            pass
    return DeltaLMError(f"translation failed for {where}: {type(e).__name__}: {e}")
