"""The backend contract: what a backend gives the search (``Backend``), what its graphs return
(``Encoded``, ``StepOutput``), and the step's feeds, built in one place from the graph's
declaration (``step_feeds``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..config import ModelConfig
from ..graphs import GraphSpec, new_kv_names, per_layer


@dataclass
class Encoded:
    """The encoder's output for a batch of sources, on the host: ``cross`` per decoder layer the
    cross-attention key and value (k0, v0, k1, ...), each [batch, heads, src_len, head_dim] in the
    artifact's float dtype; ``padding`` [batch, src_len] bool, True at padding."""

    cross: list[np.ndarray]
    padding: np.ndarray

    @property
    def batch(self) -> int:
        return self.padding.shape[0]

    @property
    def src_len(self) -> int:
        return self.padding.shape[1]


@dataclass
class StepOutput:
    """What one decoder step returns (``decoder_step_spec``): ``topk_scores`` / ``topk_ids``
    [rows, new_len, k] with the rules applied; ``token_scores`` [rows, new_len, score_width] (raw
    log-probs of the fed ``score_ids``); ``log_probs`` [rows, new_len, vocabulary or 0] (raw; over
    the candidates with a vocabulary shortlist); ``new_kv`` per layer the fed tokens'
    self-attention key and value (k0, v0, ...), each [rows, heads, new_len, head_dim]."""

    topk_scores: np.ndarray
    topk_ids: np.ndarray
    token_scores: np.ndarray
    log_probs: np.ndarray
    new_kv: list[np.ndarray]

    @classmethod
    def from_outputs(cls, cfg: ModelConfig, outputs: dict[str, np.ndarray]) -> StepOutput:
        """From the step graph's outputs by name (any numeric types: ids become int64, scores
        float32)."""
        return cls(
            topk_scores=np.asarray(outputs["topk_scores"], dtype=np.float32),
            topk_ids=np.asarray(outputs["topk_ids"], dtype=np.int64),
            token_scores=np.asarray(outputs["token_scores"], dtype=np.float32),
            log_probs=np.asarray(outputs["log_probs"], dtype=np.float32),
            new_kv=[outputs[name] for name in per_layer(cfg, new_kv_names)],
        )


@dataclass(frozen=True)
class BatchLimits:
    """The largest step a backend can run (a TensorRT engine's optimization profile); None: no
    limit. The search engine admits no more sentences or rows than this per decoder step."""

    rows: int | None = None
    sentences: int | None = None


@runtime_checkable
class Backend(Protocol):
    """What the search needs of a backend.

    ``cfg``: the model's configuration; ``topk``: k of the step graph's in-graph top-k;
    ``step_spec``: the step graph's interface (``decoder_step`` or, for a backend opened for a
    vocabulary shortlist, ``decoder_step_shortlist``, which also takes ``candidates``);
    ``float_dtype``: the dtype of the caches and cross K/V the step takes; ``limits``: the largest
    step it runs.
    """

    cfg: ModelConfig
    topk: int
    step_spec: GraphSpec
    float_dtype: np.dtype
    limits: BatchLimits

    def encode(self, src_tokens: np.ndarray) -> Encoded:
        """src_tokens [batch, src_len] int64, left-padded -> the encoder's cross K/V."""
        ...

    def run_step(self, feeds: dict[str, np.ndarray]) -> StepOutput:
        """One run of the step graph on ``feeds`` (every input of ``step_spec``, by name; arrays
        the backend may read but must not keep or modify)."""
        ...

    def close(self) -> None:
        """Release sessions, engines, device memory. Idempotent."""
        ...


def step_output_shapes(
    cfg: ModelConfig, spec: GraphSpec, feeds: dict[str, np.ndarray]
) -> dict[str, tuple[tuple, np.dtype]]:
    """(shape, dtype) of every output of the step graph ``spec`` for ``feeds``: ``topk_*`` [rows,
    new_len, k], ``token_scores`` [rows, new_len, score_width], ``log_probs`` [rows, new_len, the
    vocabulary (the candidates of a shortlist graph), or 0 without ``want_log_probs``], new K/V
    [rows, heads, new_len, head_dim]."""
    rows, new_len = feeds["tokens"].shape
    width = feeds["score_ids"].shape[-1]
    vocab = 0
    if feeds["want_log_probs"]:
        vocab = len(feeds["candidates"]) if "candidates" in feeds else cfg.vocab_size
    k = spec.outputs[0].shape[-1]
    shapes = {
        "topk_scores": (rows, new_len, k),
        "topk_ids": (rows, new_len, k),
        "token_scores": (rows, new_len, width),
        "log_probs": (rows, new_len, vocab),
    }
    return {
        t.name: (shapes.get(t.name, (rows, cfg.heads, new_len, cfg.head_dim)), np.dtype(t.dtype)) for t in spec.outputs
    }


def step_feeds(spec: GraphSpec, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """The feeds of one step, checked against the graph's declaration: every input present,
    nothing unknown, each array contiguous in the declared dtype (the float inputs of an fp16
    graph are float16)."""
    names = set(spec.input_names)
    extra = sorted(set(arrays) - names)
    missing = sorted(names - set(arrays))
    if extra or missing:
        raise ValueError(f"{spec.name} feeds: missing {missing}, unknown {extra}")
    # np.require, not np.ascontiguousarray: that one makes a scalar (want_log_probs) 1-D
    return {t.name: np.require(arrays[t.name], dtype=t.dtype, requirements="C") for t in spec.inputs}
