"""``deltalm.Translator``: a model opened once, translating lists or streams of sentences.

    import deltalm

    with deltalm.Translator("demo/artifact", threads=2) as translator:
        [result] = translator.translate_batch(["Die Katze sieht den roten Apfel."], beam=5)
        print(result.text, result.hypotheses[0].tokens, result.hypotheses[0].score)

Sentences are tokenized (sentencepiece + fairseq dictionary), sorted by source length and decoded
by the search engine (``deltalm.search.Engine``, fairseq's SequenceGenerator semantics) with
continuous batching: a sentence that finishes leaves the batch at once and the next one takes its
place. ``translate_batch`` / ``translate_iterable`` return exactly one ``Translation`` per input
sentence, in input order; ``translate_stream`` yields each sentence's growing best hypothesis and
its ``Translation`` as soon as it is done. Beam search and greedy decoding give the same result for
a sentence whatever it is batched with; so does sampling with a seed (each sentence draws from a
generator seeded by the seed and its position).

Options: ``TranslateOptions`` (``deltalm.options``), given as an ``options=`` object and / or as
keyword overrides (``translate_batch(lines, beam=4)``).

Thread safety: a Translator may be shared by threads; each decoder step holds its lock, so calls
from several threads interleave step by step (a backend runs one step at a time with all of its
threads). For parallel decoding open one Translator per worker, each with its share of the cores.

Scores are natural logarithms (fairseq's ``generate`` prints base 2 in its H-/P- lines: divide by
ln 2 to compare). Line numbers in messages are 1-based; ``Translation.index`` is 0-based.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from .artifact import MANIFEST, read_manifest, verify_files
from .atomic import previous_artifact_of
from .backends import BACKENDS, Backend, load_backend
from .errors import DecodeError, DeltaLMError, InputError, SentenceError, SentenceTooLong
from .options import OptionError, TranslateOptions
from .scoring import Score, ScorePair, score_pairs
from .search import Engine, Finished, Hypothesis, Partial, Sentence
from .shortlist import Shortlist
from .tokenizer import Tokenizer

__all__ = [
    "Translator",
    "Translation",
    "PartialTranslation",
    "Score",
    "Hypothesis",
    "TranslateOptions",
    "OptionError",
    "BatchOptions",
    "format_translation",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHUNK_LINES",
]

DEFAULT_BATCH_SIZE = 32
DEFAULT_CHUNK_LINES = 2000
_END = object()


@dataclass(frozen=True)
class BatchOptions:
    """How many sentences decode together (the results do not depend on it)."""

    batch_size: int | None = DEFAULT_BATCH_SIZE  # sentences decoding at once; None: only max_tokens limits
    max_tokens: int | None = None  # source tokens decoding at once: sentences x their longest source

    def validate(self) -> None:
        if self.batch_size is None and self.max_tokens is None:
            raise OptionError("batch_size", "or max_tokens must be given")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise OptionError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise OptionError("max_tokens", f"must be >= 1, got {self.max_tokens}")


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Translation:
    """The result for one input sentence."""

    index: int  # 0-based position of the sentence in the input
    hypotheses: list[Hypothesis] = field(default_factory=list)  # n-best, best first; [] for an empty line

    @property
    def text(self) -> str:
        return self.hypotheses[0].text if self.hypotheses else ""

    def to_dict(self) -> dict:
        """The record of ``deltalm translate --format jsonl`` (also the HTTP API's result):
        -inf / NaN scores become None (null), so that strict JSON readers accept every line."""
        return {
            "id": self.index,
            "nbest": [
                {
                    "tokens": list(h.tokens),
                    "score": _json_float(h.score),
                    "positional_scores": [_json_float(s) for s in h.positional_scores],
                    "text": h.text,
                }
                for h in self.hypotheses
            ],
        }

    def to_json(self) -> str:
        """``to_dict()`` as one line of JSON (a JSONL record)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)


@dataclass(frozen=True)
class PartialTranslation:
    """The best hypothesis of sentence ``index`` so far (``translate_stream``): its tokens (forced
    prefix included, no ``</s>`` yet) and their text."""

    index: int
    tokens: list[int]
    text: str

    def to_dict(self) -> dict:
        """The streamed event's record: ``{"id", "partial": true, "tokens", "text"}``."""
        return {"id": self.index, "partial": True, "tokens": list(self.tokens), "text": self.text}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def format_translation(t: Translation, fmt: str) -> str:
    """One output line (``fmt`` "text" or "jsonl"), without its newline."""
    return t.to_json() if fmt == "jsonl" else t.text


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
        loaded = Shortlist.load(shortlist) if isinstance(shortlist, (str, Path)) else shortlist
        backend_name, device, kind = _resolve(Path(model), backend, device, spm, dictionary, config)
        if loaded is not None and (kind != "artifact" or backend_name != "ort"):
            raise OptionError("shortlist", "runs on an artifact with the ort backend")
        if kind == "checkpoint":
            assert spm is not None and dictionary is not None  # _resolve refuses a checkpoint without them
            tokenizer = Tokenizer(spm, dictionary, list(src_prefix or []))
            tokenizer.encode_target_prefix(tgt_prefix or [])  # unknown symbols fail before the model loads
            opened = load_backend("torch", str(model), config=config, dict_path=str(dictionary), threads=threads)
        else:
            # The manifest first (cheap): a newer format, an unfinished export or a directory that
            # is no artifact at all is reported as such, not as a missing tokenizer file.
            directory = Path(model)
            spm_path, dict_path = directory / "spm.model", directory / "dict.txt"
            if (directory / MANIFEST).exists() or not spm_path.exists():
                manifest = read_manifest(directory)
                names = manifest.tokenizer
                spm_path, dict_path = (
                    directory / names.get("spm", "spm.model"),
                    directory / names.get("dict", "dict.txt"),
                )
                verify_files(directory, manifest, [spm_path.name, dict_path.name])
            tokenizer = Tokenizer(spm_path, dict_path, list(src_prefix or []))
            tokenizer.encode_target_prefix(tgt_prefix or [])
            if loaded is not None:
                loaded.check_dictionary(dict_path, len(tokenizer))
                opened = load_backend("ort", directory, device=device, threads=threads, shortlist=True)
            else:
                opened = load_backend(backend_name, directory, device=device, threads=threads)
        self._setup(opened, tokenizer, tgt_prefix, warn, backend_name, device, Path(model), loaded)

    @classmethod
    def from_backend(
        cls,
        backend: Backend,
        tokenizer: Tokenizer,
        tgt_prefix: Sequence[str] | None = None,
        warn: Callable[[str], None] = _warn_stderr,
    ) -> Translator:
        """A Translator over a backend object of your own (``deltalm.backends.Backend``) and a
        tokenizer."""
        self = cls.__new__(cls)
        self._setup(backend, tokenizer, tgt_prefix, warn, type(backend).__name__, None, None, None)
        return self

    def _setup(
        self, backend: Backend, tokenizer: Tokenizer, tgt_prefix, warn, backend_name: str, device, model_path, shortlist
    ) -> None:
        """The one place a Translator's state is set, whichever way it was opened."""
        self._lock = threading.Lock()
        self._warn = warn
        self.backend_name, self.device, self.model_path = backend_name, device, model_path
        self._backend: Backend | None = backend  # None once closed
        self.tokenizer, self.config = tokenizer, backend.cfg
        self.tgt_prefix = tokenizer.encode_target_prefix(tgt_prefix or [])
        self.shortlist = shortlist
        _check_vocabulary(self.config, tokenizer)

    # -- properties
    @property
    def topk(self) -> int:
        """k of the backend's in-graph top-k: beams up to k // 2 take the fast path."""
        return int(self.backend.topk)

    @property
    def max_target_len(self) -> int | None:
        """The longest target a TensorRT engine's profile allows (None: the model's positions)."""
        return getattr(self._backend, "max_target_len", None)

    @property
    def backend(self) -> Backend:
        """The opened backend (for an ``Engine`` of your own: ``engine()``)."""
        if self._backend is None:
            raise InputError("this Translator is closed")
        return self._backend

    # -- life cycle
    def close(self) -> None:
        """Releases the backend (sessions, engines, device memory). Idempotent."""
        with self._lock:
            backend, self._backend = getattr(self, "_backend", None), None
        if backend is not None:
            backend.close()

    def __enter__(self) -> Translator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sentences in, sentences out
    def options(self, options: TranslateOptions | None = None, **overrides) -> TranslateOptions:
        """``options`` with ``overrides``, validated, and checked against this model (the beam
        against the vocabulary, prefix symbols against the dictionary, lengths against the
        positions): every error now, before a sentence is read."""
        opts = TranslateOptions.resolve(options, **overrides)
        src_prefix, _ = self._prefixes(opts)
        cfg = self.config
        if opts.beam >= cfg.vocab_size:
            raise OptionError("beam", f"{opts.beam} must be smaller than the vocabulary ({cfg.vocab_size})")
        if len(src_prefix) + 2 > cfg.max_positions:
            raise OptionError(
                "src_prefix",
                f"({len(src_prefix)} tokens) leaves no room for text in the model's "
                f"{cfg.max_positions} source positions",
            )
        if opts.min_len > cfg.max_positions - 1:
            raise OptionError("min_len", f"{opts.min_len} exceeds the model's maximum length {cfg.max_positions - 1}")
        limit = self.max_target_len  # TensorRT: the engine profile's cache maximum
        if limit is not None and opts.max_len_a == 0 and min(opts.max_len_b, cfg.max_positions - 1) > limit:
            raise OptionError(
                "max_len_b",
                f"{opts.max_len_b} exceeds the {limit} target tokens the TensorRT engines were built for; "
                f"pass {limit} or rebuild them with `deltalm engines DIR --max-tgt-len ...`",
            )
        return opts

    def _prefixes(self, opts: TranslateOptions) -> tuple[list[int], list[int]]:
        """The source and forced target prefix ids of ``opts``; a symbol the dictionary lacks is an
        ``OptionError`` naming the option."""
        tok = self.tokenizer
        try:
            src = tok.src_prefix if opts.src_prefix is None else tok.encode_source_prefix(opts.src_prefix)
        except DeltaLMError as e:
            raise OptionError("src_prefix", f"{opts.src_prefix}: {e}") from None
        try:
            tgt = self.tgt_prefix if opts.tgt_prefix is None else tok.encode_target_prefix(opts.tgt_prefix)
        except DeltaLMError as e:
            raise OptionError("tgt_prefix", f"{opts.tgt_prefix}: {e}") from None
        return src, tgt

    def prepare(
        self,
        lines: Sequence[str | bytes],
        options: TranslateOptions,
        *,
        start: int = 0,
        errors: str = "strict",
        target_prefix: Sequence[str | None] | None = None,
        constraints: Sequence[Sequence[str] | None] | None = None,
        source: str | None = None,
    ) -> list[Sentence | None]:
        """What the engine decodes for each line: a ``Sentence`` (source ids, options, forced
        target ids, sampling seed), or None for a line with nothing to translate (empty, blank).
        ``start``: the position of ``lines[0]`` in the whole input (messages and seeds count from
        it); ``target_prefix``: per line a target prefix text (tokenized as a target, no ``</s>``)
        or None. A line the model cannot take raises ``SentenceError`` naming its position;
        a line longer than the model's positions is cut with ``options.truncate`` (and a
        warning)."""
        tok, cfg = self.tokenizer, self.config
        src_prefix, tgt_prefix = self._prefixes(options)
        for name, per_line in (("target_prefix", target_prefix), ("constraints", constraints)):
            if per_line is not None and len(per_line) != len(lines):
                raise InputError(f"{name} has {len(per_line)} entries for {len(lines)} sentences")
        max_src = cfg.max_positions  # source tokens, source prefix and </s> included
        bare = len(src_prefix) + 1  # a source with no text
        out: list[Sentence | None] = []
        for k, raw in enumerate(lines):
            index = start + k
            try:
                ids = tok.encode(_decode_line(raw, index, errors, source), src_prefix)
                prefix = list(tgt_prefix)
                line_prefix = target_prefix[k] if target_prefix is not None else None
                if line_prefix:
                    prefix += self._target_ids(line_prefix)
                wanted = self._constraint_ids(constraints[k] if constraints is not None else None)
            except SentenceError:
                raise
            except DeltaLMError as e:
                raise SentenceError(index, str(e), source) from None
            if len(ids) == bare:  # nothing sentencepiece keeps (empty / blank line): nothing to decode
                out.append(None)
                continue
            if len(ids) > max_src:
                if not options.truncate:
                    raise SentenceTooLong(index, len(ids), max_src, source)
                self._warn(
                    f"{source or 'input'} line {index + 1}: {len(ids)} source tokens, truncated to the "
                    f"model's {max_src}"
                )
                ids = ids[: max_src - 1] + [tok.eos]
            seed = None if options.seed is None else (options.seed, index)
            sentence = Sentence(tuple(ids), options, tuple(prefix), seed, wanted)
            try:
                Engine.check_sentence(cfg, sentence)
            except DeltaLMError as e:
                raise SentenceError(index, str(e), source) from None
            out.append(sentence)
        return out

    def _constraint_ids(self, texts: Sequence[str] | None) -> tuple[tuple[int, ...], ...]:
        if texts is None:
            return ()
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError("the constraints of a sentence must be a list of target texts")
        out = []
        for text in texts:
            ids = self._target_ids(text)
            if not ids:
                raise InputError(f"the constraint {text!r} is empty")
            if self.tokenizer.unk in ids:
                unknown = [p for p in self.tokenizer.pieces(text) if p not in self.tokenizer.dictionary]
                raise InputError(
                    f"the constraint {text!r} has pieces the dictionary does not know "
                    f"({', '.join(unknown)}): it would require <unk>"
                )
            out.append(tuple(ids))
        return tuple(out)

    def _target_ids(self, text: str) -> list[int]:
        """A target text as the model's ids (sentencepiece + dictionary, no ``</s>``)."""
        if not isinstance(text, str):
            raise InputError(f"a target prefix must be text, got {type(text).__name__}")
        return self.tokenizer.encode(text, [])[:-1]

    def translation(self, index: int, sentence: Sentence | None, hypotheses: Sequence[Hypothesis]) -> Translation:
        """The ``Translation`` of a finished sentence: its hypotheses with their text (the forced
        target prefix of the translator's ``tgt_prefix`` symbols removed)."""
        if sentence is None:
            return Translation(index)
        strip = self._prefixes(sentence.options)[1]
        return Translation(
            index,
            [
                Hypothesis(h.tokens, h.score, h.positional_scores, _hypothesis_text(self.tokenizer, h.tokens, strip))
                for h in hypotheses
            ],
        )

    def partial(self, index: int, sentence: Sentence, tokens: Sequence[int]) -> PartialTranslation:
        strip = self._prefixes(sentence.options)[1]
        return PartialTranslation(index, list(tokens), _hypothesis_text(self.tokenizer, list(tokens), strip))

    def engine(self, *, max_rows: int | None = None, max_tokens: int | None = None, partials: bool = False) -> Engine:
        """A search engine over this translator's backend (and shortlist), for a scheduler of your
        own (``deltalm serve``): ``prepare`` sentences, ``Engine.add`` them, ``Engine.step`` under
        ``lock``, turn ``Finished`` events into results with ``translation``."""
        return Engine(
            self.backend, max_rows=max_rows, max_tokens=max_tokens, shortlist=self.shortlist, partials=partials
        )

    @property
    def lock(self) -> threading.Lock:
        """Held by every decoder step of this translator's calls (share it to interleave)."""
        return self._lock

    # -- translation
    def translate_batch(
        self,
        sentences: Sequence[str],
        *,
        options: TranslateOptions | None = None,
        target_prefix: Sequence[str | None] | None = None,
        constraints: Sequence[Sequence[str] | None] | None = None,
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        max_tokens: int | None = None,
        **overrides,
    ) -> list[Translation]:
        """One ``Translation`` per sentence, in input order. ``options`` (``TranslateOptions``)
        and / or ``overrides``, its fields by name (beam, nbest, lenpen, max_len_a, max_len_b,
        min_len, unkpen, no_repeat_ngram_size, sampling, temperature, sampling_topk,
        sampling_topp, seed, src_prefix, tgt_prefix, truncate). ``target_prefix``: one forced
        target prefix text per sentence (None or "" for none; after ``tgt_prefix``'s symbols),
        kept in the hypotheses' tokens and text. ``constraints``: per sentence a list of target
        texts every hypothesis must contain (lexically constrained decoding, fairseq's
        ``--constraints``; ``constraint_order`` "ordered" or "unordered"), or None.
        ``batch_size`` / ``max_tokens``: how many
        sentences decode at once (sentences, and sentences x their longest source). Bad options
        raise ``OptionError`` before anything is decoded; a failing sentence a ``SentenceError``
        naming its position."""
        prepared, batching = self._prepare_list(
            "translate_batch", sentences, options, target_prefix, constraints, batch_size, max_tokens, overrides
        )
        return self._decode(prepared, 0, batching)

    def translate_iterable(
        self,
        lines: Iterable[str | bytes],
        *,
        options: TranslateOptions | None = None,
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        max_tokens: int | None = None,
        chunk_lines: int = DEFAULT_CHUNK_LINES,
        errors: str = "strict",
        **overrides,
    ) -> Iterator[Translation]:
        """Translations of ``lines`` in order, produced lazily: ``chunk_lines`` lines are read,
        sorted by length and translated at a time (1 for interactive use: each line is answered
        before the next is read). Lines may be str or UTF-8 bytes (``errors``: "strict" fails on
        invalid UTF-8, "replace" decodes it with U+FFFD); a trailing newline is ignored and an
        empty line gives a Translation with no hypotheses. Options are checked at the call, before
        any line is read."""
        if not isinstance(chunk_lines, int) or chunk_lines < 1:
            raise OptionError("chunk_lines", f"must be >= 1, got {chunk_lines}")
        lines = iter(lines)
        chunks = iter(lambda: list(itertools.islice(lines, chunk_lines)), [])
        return self.translate_chunks(
            chunks, options=options, batch_size=batch_size, max_tokens=max_tokens, errors=errors, **overrides
        )

    def translate_chunks(
        self,
        chunks: Iterable[Sequence[str | bytes]],
        *,
        options: TranslateOptions | None = None,
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        max_tokens: int | None = None,
        errors: str = "strict",
        target_prefix: Iterable[str | None] | None = None,
        constraints: Iterable[Sequence[str] | None] | None = None,
        source: str | None = None,
        start: int = 0,
        **overrides,
    ) -> Iterator[Translation]:
        """As ``translate_iterable``, with the grouping chosen by the caller: each element of
        ``chunks`` is a list of lines decoded together (e.g. the lines a pipe had ready), and its
        translations are yielded before the next chunk is read. Indices run on across chunks,
        from ``start`` (the position of the first line in ``source``, the name messages give the
        input: a file's name and line numbers). ``target_prefix`` / ``constraints``: per line,
        in step with the lines of the chunks (iterables read as the lines are)."""
        opts = self.options(options, **overrides)
        batching = BatchOptions(batch_size, max_tokens)
        batching.validate()
        if errors not in ("strict", "replace"):
            raise OptionError("errors", f"must be strict or replace, got {errors!r}")
        per_line = {"target_prefix": target_prefix, "constraints": constraints}
        return self._chunks(
            iter(chunks),
            opts,
            batching,
            errors,
            source,
            start,
            {k: iter(v) for k, v in per_line.items() if v is not None},
        )

    def _chunks(
        self,
        chunks: Iterator,
        opts: TranslateOptions,
        batching: BatchOptions,
        errors: str,
        source: str | None,
        start: int,
        per_line: dict[str, Iterator],
    ) -> Iterator[Translation]:
        for chunk in chunks:
            chunk = list(chunk)
            extra = {}
            for name, values in per_line.items():
                extra[name] = list(itertools.islice(values, len(chunk)))
                if len(extra[name]) < len(chunk):
                    raise InputError(
                        f"the {name.replace('_', ' ')} lines end before {source or 'the input'} does "
                        f"(at line {start + len(extra[name]) + 1})"
                    )
            prepared = self.prepare(chunk, opts, start=start, errors=errors, source=source, **extra)
            yield from self._decode(prepared, start, batching, source)
            start += len(chunk)
        for name, values in per_line.items():
            if next(values, _END) is not _END:
                raise InputError(f"there are more {name.replace('_', ' ')} lines than lines of {source or 'input'}")

    def translate_stream(
        self,
        sentences: Sequence[str],
        *,
        options: TranslateOptions | None = None,
        target_prefix: Sequence[str | None] | None = None,
        constraints: Sequence[Sequence[str] | None] | None = None,
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        max_tokens: int | None = None,
        **overrides,
    ) -> Iterator[PartialTranslation | Translation]:
        """As ``translate_batch``, but yields as the decoding goes: after each step a
        ``PartialTranslation`` per sentence still decoding (its best hypothesis so far), and each
        sentence's final ``Translation`` as soon as it is done (in the order they finish; an empty
        sentence's at once). Every sentence gets exactly one ``Translation``, equal to what
        ``translate_batch`` returns for it."""
        prepared, batching = self._prepare_list(
            "translate_stream", sentences, options, target_prefix, constraints, batch_size, max_tokens, overrides
        )
        return self._events(prepared, 0, batching, partials=True)

    def _prepare_list(
        self, method: str, sentences, options, target_prefix, constraints, batch_size, max_tokens, overrides
    ) -> tuple[list[Sentence | None], BatchOptions]:
        """The options, batching and prepared sentences of ``translate_batch`` / ``translate_stream``,
        checked before anything is decoded."""
        if isinstance(sentences, (str, bytes)):
            raise InputError(f"{method} takes a list of sentences, not one string")
        opts = self.options(options, **overrides)
        batching = BatchOptions(batch_size, max_tokens)
        batching.validate()
        prepared = self.prepare(list(sentences), opts, target_prefix=target_prefix, constraints=constraints)
        return prepared, batching

    def score_batch(
        self,
        sources: Sequence[str],
        targets: Sequence[str],
        *,
        options: TranslateOptions | None = None,
        max_tokens: int | None = None,
        source_name: str | None = None,
        **overrides,
    ) -> list[Score]:
        """The score of each (source, target) pair, in input order: the target's ids (forced
        target prefix symbols of ``tgt_prefix`` first, final ``</s>`` included), the natural-log
        probability of each given the source and the tokens before it, and their mean (fairseq's
        ``SequenceScorer`` / ``generate --score-reference``). Of the options only ``src_prefix``,
        ``tgt_prefix`` and ``truncate`` (of sources) apply. ``max_tokens``: padded target tokens
        per decoder run (default: as many as fit 256 MB of logits). A pair the model cannot take
        (an empty target, a source or target longer than the model's positions) raises
        ``SentenceError`` naming its position (in ``source_name``, a file, when given)."""
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise OptionError("max_tokens", f"must be >= 1, got {max_tokens}")
        pairs = self.prepare_scores(sources, targets, self.options(options, **overrides), source=source_name)
        with self._lock:
            try:
                scored = score_pairs(self.backend, [p.src for p in pairs], [p.tokens for p in pairs], max_tokens)
            except DecodeError as e:
                lines = sorted(pairs[k].index for k in e.keys)
                raise DecodeError(
                    lines,
                    e.cause,
                    f"scoring failed for {source_name or 'input'} "
                    f"line{'s' if len(lines) > 1 else ''} "
                    f"{_line_ranges([n + 1 for n in lines])}: {type(e.cause).__name__}: "
                    f"{e.cause}",
                ) from e.cause
        return [pair.score(positional) for pair, positional in zip(pairs, scored)]

    def prepare_scores(
        self, sources: Sequence[str], targets: Sequence[str], options: TranslateOptions, *, source: str | None = None
    ) -> list[ScorePair]:
        """The pairs ``score_batch`` scores, checked (lengths of the lists, empty and over-long
        sources and targets: one error naming the pair); for a scheduler of your own (``deltalm
        serve`` scores the pairs of concurrent requests together with ``deltalm.scoring.score_pairs``)."""
        for name, value in (("sources", sources), ("targets", targets)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise InputError(f"{name} must be a list of sentences")
        if len(sources) != len(targets):
            raise InputError(f"{len(sources)} sources but {len(targets)} targets: give one target per source")
        if "candidates" in self.backend.step_spec.input_names:
            raise InputError("scoring needs the full decoder step: open the model without a vocabulary shortlist")
        prepared = self.prepare(list(sources), options, source=source)
        tgt_prefix = self._prefixes(options)[1]
        limit = self.config.max_positions
        pairs = []
        for k, (sentence, target) in enumerate(zip(prepared, targets)):
            if sentence is None:
                raise SentenceError(k, "has an empty source", source)
            if not isinstance(target, str):
                raise SentenceError(k, f"has a target that is a {type(target).__name__}, not text", source)
            try:
                ids = list(tgt_prefix) + self.tokenizer.encode(target, [])
            except DeltaLMError as e:
                raise SentenceError(k, f"target: {e}", source) from None
            if len(ids) == len(tgt_prefix) + 1:
                raise SentenceError(k, "has an empty target", source)
            if len(ids) > limit:
                raise SentenceError(
                    k, f"has {len(ids)} target tokens (with </s>); the model scores at most {limit}", source
                )
            pairs.append(ScorePair(k, sentence.src, tuple(ids)))
        return pairs

    def _decode(
        self, prepared: list[Sentence | None], start: int, batching: BatchOptions, source: str | None = None
    ) -> list[Translation]:
        results: list[Translation | None] = [None] * len(prepared)
        for event in self._events(prepared, start, batching, partials=False, source=source):
            assert isinstance(event, Translation)  # partials=False: no PartialTranslation
            results[event.index - start] = event
        return results  # type: ignore[return-value]  # every slot is filled

    def _events(
        self,
        prepared: list[Sentence | None],
        start: int,
        batching: BatchOptions,
        partials: bool,
        source: str | None = None,
    ) -> Iterator[PartialTranslation | Translation]:
        if batching.max_tokens is not None:
            for k, sentence in enumerate(prepared):
                if sentence is not None and len(sentence.src) > batching.max_tokens:
                    raise SentenceError(
                        start + k,
                        f"has {len(sentence.src)} source tokens, more than --max-tokens {batching.max_tokens}",
                        source,
                    )
        beams = {s.options.beam for s in prepared if s is not None}
        max_rows = batching.batch_size * max(beams) if batching.batch_size is not None and beams else None
        engine = Engine(
            self.backend, max_rows=max_rows, max_tokens=batching.max_tokens, shortlist=self.shortlist, partials=partials
        )

        def longest_first(k: int) -> int:
            sentence = prepared[k]
            return -len(sentence.src) if sentence else 0

        # longest first: sentences of similar length decode together (less padding)
        for k in sorted(range(len(prepared)), key=longest_first):
            sentence = prepared[k]
            if sentence is None:
                yield Translation(start + k)
            else:
                engine.add(k, sentence)
        while not engine.idle:
            with self._lock:
                if self._backend is None:
                    raise InputError("this Translator is closed")
                try:
                    events = engine.step()
                except DecodeError as e:
                    lines = sorted(start + k for k in e.keys)
                    raise DecodeError(
                        lines,
                        e.cause,
                        f"translation failed for {source or 'input'} "
                        f"line{'s' if len(lines) > 1 else ''} "
                        f"{_line_ranges([n + 1 for n in lines])}: {type(e.cause).__name__}: "
                        f"{e.cause}",
                    ) from e.cause
            for event in events:  # their keys are the ones added above: positions in prepared
                if isinstance(event, Finished):
                    key = cast(int, event.key)
                    yield self.translation(start + key, prepared[key], event.hypotheses)
                elif isinstance(event, Partial):
                    key = cast(int, event.key)
                    added = prepared[key]
                    assert added is not None  # the engine was given only sentences
                    yield self.partial(start + key, added, event.tokens)


def _hypothesis_text(tokenizer: Tokenizer, tokens: list[int], prefix: list[int]) -> str:
    if prefix and tokens[: len(prefix)] == prefix:
        tokens = tokens[len(prefix) :]
    return tokenizer.decode(tokens)


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
            raise InputError(
                f"the {backend} backend runs an artifact directory; a checkpoint runs with the torch backend"
            )
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


def _decode_line(raw: str | bytes, index: int, errors: str, source: str | None = None) -> str:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8", errors=errors)
        except UnicodeDecodeError as e:
            raise SentenceError(
                index,
                f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); pass --errors "
                f"replace to translate it with U+FFFD for bad bytes",
                source,
            ) from None
    elif isinstance(raw, str):
        text = raw
    else:
        raise SentenceError(index, f"is a {type(raw).__name__}, not text", source)
    text = text.removesuffix("\n").removesuffix("\r")
    if index == 0:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark is not text
    return text


def _line_ranges(numbers: list[int], limit: int = 12) -> str:
    """[3, 4, 5, 9] -> "3-5, 9" (at most ``limit`` ranges shown)."""
    ranges: list[str] = []
    for _, group in itertools.groupby(enumerate(numbers), key=lambda p: p[1] - p[0]):
        run = [n for _, n in group]
        ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    shown = ", ".join(ranges[:limit])
    return shown if len(ranges) <= limit else f"{shown}, ... ({len(numbers)} lines)"
