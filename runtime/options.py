"""``TranslateOptions``: what to search for, one frozen and validated type used by every layer
(the library's calls, the command line, the HTTP API, the cluster runner) and, per sentence, by the
search itself. Errors name the option by its keyword (``OptionError.option``); the command line
shows it as ``--option-name``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import InputError

CONSTRAINT_ORDERS = ("ordered", "unordered")


class OptionError(InputError):
    """A translation option with a value it cannot take. ``option`` is its keyword name (as in
    ``translate_batch`` and the HTTP API); the command line shows it as ``--option-name``."""

    def __init__(self, option: str, reason: str):
        self.option, self.reason = option, reason
        super().__init__(f"{option} {reason}")


@dataclass(frozen=True)
class TranslateOptions:
    """What to search for, per call. Hashable: requests with equal options can share batches."""

    beam: int = 5  # beam size; with sampling, samples per sentence
    nbest: int = 1  # hypotheses returned per sentence, best first
    lenpen: float = 1.0  # score = sum of log-probs / length ** lenpen
    max_len_a: float = 0.0  # max length = max_len_a * the sentence's source tokens + max_len_b
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
    tgt_prefix: tuple[str, ...] | None = (
        None  # forced target prefix symbols (removed from the text); None: the translator's
    )
    truncate: bool = False  # cut sources longer than the model's positions instead of failing
    constraint_order: str = "ordered"  # lexical constraints: "ordered" (in the given order) or "unordered"

    @classmethod
    def from_mapping(cls, values: dict) -> TranslateOptions:
        """Options from a JSON-like mapping, each value checked for its type (``OptionError``
        naming the option). Unknown names are refused."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise OptionError(unknown[0], f"is not an option (options: {', '.join(fields)})")
        checked: dict[str, Any] = {}  # each value checked against its field's type below
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
            elif name == "constraint_order":
                if value not in CONSTRAINT_ORDERS:
                    raise OptionError(name, f"must be one of {', '.join(CONSTRAINT_ORDERS)}, got {value!r}")
                checked[name] = value
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

    def replace(self, **changes) -> TranslateOptions:
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
        if self.constraint_order not in CONSTRAINT_ORDERS:
            raise OptionError(
                "constraint_order", f"must be one of {', '.join(CONSTRAINT_ORDERS)}, got {self.constraint_order!r}"
            )

    @property
    def needs_log_probs(self) -> bool:
        """True when a step's candidates cannot come from the in-graph top-k alone."""
        return self.sampling or self.temperature != 1.0 or self.no_repeat_ngram_size > 0

    @classmethod
    def resolve(cls, options: TranslateOptions | None = None, **overrides) -> TranslateOptions:
        """``options`` (default: the defaults) with ``overrides`` (field names) applied, validated.
        An unknown name is an InputError listing the options."""
        base = options if options is not None else cls()
        if not isinstance(base, cls):
            raise InputError(f"options must be a TranslateOptions, got {type(base).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InputError(f"unknown translation option {unknown[0]!r}; the options are: {', '.join(sorted(known))}")
        for name in ("src_prefix", "tgt_prefix"):
            if overrides.get(name) is not None and not isinstance(overrides[name], tuple):
                value = overrides[name]
                overrides[name] = tuple(value.split() if isinstance(value, str) else value)
        opts = dataclasses.replace(base, **overrides) if overrides else base
        opts.validate()
        return opts

    def to_dict(self) -> dict:
        """The options as keyword arguments (``Translator.translate_batch(**opts.to_dict())``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
