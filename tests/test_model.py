"""The PyTorch rebuild: positions, incremental decoding == teacher-forced forward, grouped
cross-attention, rows at different positions over a cache the caller owns."""

import numpy as np
import pytest
import torch

from deltalm.export.graphs import DecoderStepGraph, EncoderGraph
from deltalm.export.model import make_positions
from deltalm.graphs import cache_names, cross_names, per_layer
from deltalm.search import StepRules


def left_padded(rows, pad=1):
    width = max(len(r) for r in rows)
    return torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.int64)


def test_positions_follow_fairseq_left_padding_rule(tiny_cfg):
    src = left_padded([[5, 6, 7, 2], [8, 2]])
    assert make_positions(src, tiny_cfg).tolist() == [[2, 3, 4, 5], [1, 1, 2, 3]]


def test_encoder_output_at_real_tokens_does_not_depend_on_padding(tiny_model):
    a = torch.tensor([[5, 6, 7, 2]])
    batch = left_padded([[9, 10, 11, 12, 13, 2], [5, 6, 7, 2]])
    enc_a, _ = tiny_model.encoder(a)
    enc_b, pad = tiny_model.encoder(batch)
    assert torch.allclose(enc_a[0], enc_b[1, 2:], atol=1e-5)
    assert torch.all(enc_b[1, :2] != 0)  # pad rows go through the layers (masked as keys only)
    assert pad[1].tolist() == [True, True, False, False, False, False]


def step_feeds(cfg, tokens, positions, cache, cross, src, want_log_probs=True):
    rows = tokens.shape[0]
    feeds = {
        "tokens": tokens,
        "positions": positions,
        "src_padding": src.eq(cfg.pad),
        "forced_tokens": torch.full((rows,), -1),
        "ban_eos": torch.zeros(rows, dtype=torch.bool),
        "only_eos": torch.zeros(rows, dtype=torch.bool),
        "unk_penalty": torch.zeros(rows),
        "score_ids": tokens.unsqueeze(-1) % cfg.vocab_size,
        "want_log_probs": torch.tensor(want_log_probs),
    }
    feeds |= {name: t for name, t in zip(per_layer(cfg, cache_names), cache)}
    feeds |= {name: t for name, t in zip(per_layer(cfg, cross_names), cross)}
    return feeds


def run_steps(tiny_model, src, prev, group=1, k=10):
    """Feed prev [rows, T] one token at a time through DecoderStepGraph, writing each step's new
    keys / values into a cache of our own; returns log-probs [rows, T, V] and the cache.
    rows = batch * group (hypotheses grouped by sentence)."""
    cfg = tiny_model.cfg
    enc = EncoderGraph(tiny_model)(src)
    step_graph = DecoderStepGraph(tiny_model, k)
    rows, steps = prev.shape
    cache = [torch.zeros(rows, cfg.heads, steps + 2, cfg.head_dim) for _ in range(2 * cfg.decoder_layers)]
    out = []
    for t in range(steps):
        res = step_graph(
            *step_graph.inputs(step_feeds(cfg, prev[:, t : t + 1], torch.full((rows,), t), cache, enc[1:], src))
        )
        out.append(res[3][:, 0])
        for c, new in zip(cache, res[4:]):
            c[:, :, t] = new[:, :, 0]
    return torch.stack(out, dim=1), cache


@torch.no_grad()
def test_incremental_decoding_equals_teacher_forced_forward(tiny_model):
    src = left_padded([[5, 6, 7, 8, 9, 2], [10, 11, 2], [12, 2]])
    prev = torch.tensor([[2, 20, 21, 22, 23], [2, 30, 31, 32, 33], [2, 40, 41, 42, 43]])
    full = tiny_model(src, prev)
    inc, _ = run_steps(tiny_model, src, prev)
    assert inc.shape == full.shape
    assert torch.allclose(inc, full, atol=1e-5)


@torch.no_grad()
def test_a_whole_target_in_one_step_equals_teacher_forced_forward(tiny_model):
    """The step graph fed a whole target at once (scoring) is the teacher-forced pass."""
    cfg = tiny_model.cfg
    src = left_padded([[5, 6, 7, 8, 9, 2], [10, 11, 2]])
    prev = torch.tensor([[2, 20, 21, 22], [2, 30, 31, 32]])
    step_graph = DecoderStepGraph(tiny_model, 10)
    empty = [torch.zeros(2, cfg.heads, 0, cfg.head_dim)] * (2 * cfg.decoder_layers)
    enc = EncoderGraph(tiny_model)(src)
    res = step_graph(*step_graph.inputs(step_feeds(cfg, prev, torch.zeros(2, dtype=torch.int64), empty, enc[1:], src)))
    full = tiny_model(src, prev)
    assert torch.allclose(res[3], full, atol=1e-5)
    assert torch.allclose(res[2][..., 0], full.gather(-1, prev.unsqueeze(-1))[..., 0], atol=1e-5)  # token_scores


@torch.no_grad()
def test_grouped_hypotheses_share_cross_kv_without_changing_results(tiny_model):
    """3 hypotheses per sentence in one step call equal each hypothesis decoded alone."""
    src = left_padded([[5, 6, 7, 8, 9, 2], [10, 11, 2]])
    prev = torch.tensor([[2, 20, 21], [2, 22, 23], [2, 24, 25], [2, 30, 31], [2, 32, 33], [2, 34, 35]])
    grouped, _ = run_steps(tiny_model, src, prev, group=3)
    for r in range(6):
        s = r // 3
        alone = tiny_model(src[s : s + 1, (src[s] != 1).nonzero()[0, 0] :], prev[r : r + 1])
        assert torch.allclose(grouped[r], alone[0], atol=1e-5)


@torch.no_grad()
def test_rows_at_different_positions_equal_recomputation(tiny_model):
    """Rows of one step at different positions, each cache holding stale entries beyond the row's
    position: every row equals its teacher-forced recomputation."""
    cfg = tiny_model.cfg
    src = left_padded([[5, 6, 7, 2], [10, 11, 12, 13, 2]])
    prev = torch.tensor([[2, 20, 21, 22], [2, 30, 31, 32]])
    _, cache = run_steps(tiny_model, src, prev)
    for c in cache:
        c[0, :, 2:] = 7.0  # row 0 continues after 2 tokens: the rest of its cache is garbage
    enc = EncoderGraph(tiny_model)(src)
    step_graph = DecoderStepGraph(tiny_model, 10)
    tokens, positions = torch.tensor([[40], [41]]), torch.tensor([2, 4])
    res = step_graph(*step_graph.inputs(step_feeds(cfg, tokens, positions, cache, enc[1:], src)))
    expect0 = tiny_model(src[0:1, 1:], torch.tensor([[2, 20, 40]]))[0, -1]
    expect1 = tiny_model(src[1:2], torch.tensor([[2, 30, 31, 32, 41]]))[0, -1]
    assert torch.allclose(res[3][0, 0], expect0, atol=1e-5)
    assert torch.allclose(res[3][1, 0], expect1, atol=1e-5)


@torch.no_grad()
def test_log_probs_are_built_only_when_asked_for(tiny_model):
    cfg = tiny_model.cfg
    src = left_padded([[5, 6, 2]])
    enc = EncoderGraph(tiny_model)(src)
    step_graph = DecoderStepGraph(tiny_model, 10)
    cache = [torch.zeros(1, cfg.heads, 0, cfg.head_dim)] * (2 * cfg.decoder_layers)
    without = step_graph(
        *step_graph.inputs(
            step_feeds(cfg, torch.tensor([[2]]), torch.tensor([0]), cache, enc[1:], src, want_log_probs=False)
        )
    )
    assert without[3].shape == (1, 1, 0)
    with_lp = step_graph(
        *step_graph.inputs(step_feeds(cfg, torch.tensor([[2]]), torch.tensor([0]), cache, enc[1:], src))
    )
    assert with_lp[3].shape == (1, 1, cfg.vocab_size)
    torch.testing.assert_close(without[0], with_lp[0])


def test_graph_rules_equal_numpy_rules(tiny_cfg):
    from deltalm.export.graphs import apply_rules as graph_rules
    from deltalm.search import apply_rules as numpy_rules

    rng = np.random.default_rng(0)
    lp = rng.normal(size=(4, tiny_cfg.vocab_size)).astype(np.float32)
    lp[0, 7] = np.nan
    for ban_eos in (False, True):
        for only_eos in (False, True):
            forced = np.array([-1, 9, -1, 4])
            ban, only = np.array([ban_eos, False, ban_eos, True]), np.array([only_eos, only_eos, False, False])
            penalty = np.array([0.7, 0.0, 1.5, 0.7], dtype=np.float32)
            rules = StepRules(forced_tokens=forced, ban_eos=ban, only_eos=only, unk_penalty=penalty)
            a = numpy_rules(lp, rules, tiny_cfg.pad, tiny_cfg.unk, tiny_cfg.eos)
            b = graph_rules(
                torch.from_numpy(lp)[:, None, :],
                tiny_cfg,
                torch.from_numpy(forced),
                torch.from_numpy(ban),
                torch.from_numpy(only),
                torch.from_numpy(penalty),
            ).numpy()[:, 0]
            np.testing.assert_array_equal(a, b)
    assert a[:, tiny_cfg.pad].max() == -np.inf


def test_tied_output_projection_shares_the_embedding(tiny_model):
    d = tiny_model.decoder
    assert d.output_projection.weight is d.embed_tokens.weight is tiny_model.encoder.embed_tokens.weight


@pytest.mark.parametrize("seed", range(20))
def test_in_graph_topk_with_rules_equals_rules_then_topk_on_the_full_vocabulary(tiny_cfg, seed):
    """The fast path (top-(k+3), rules on the candidates) against the definition (rules on every
    column, then top-k), with the special tokens placed among the best logits."""
    from deltalm.export.graphs import apply_rules as graph_rules
    from deltalm.export.graphs import topk_with_rules

    g = torch.Generator().manual_seed(seed)
    rows, V, k = 6, tiny_cfg.vocab_size, 4
    logits = torch.randn(rows, V, generator=g) * 3
    for r in range(rows):  # put pad / unk / eos near the top of some rows
        for j, tok in enumerate((tiny_cfg.pad, tiny_cfg.unk, tiny_cfg.eos)):
            if (r + j + seed) % 2 == 0:
                logits[r, tok] = logits[r].max() + 0.1 * (j + 1)
    logits = logits[:, None, :]  # [rows, T = 1, V]
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    lp = logits - lse
    forced = torch.full((rows,), -1)
    if seed % 3 == 0:
        forced[seed % rows] = tiny_cfg.unk if seed % 2 else 17
    ban_eos = torch.arange(rows) % 4 == seed % 4
    only_eos = (torch.arange(rows) % 5 == seed % 5) & (forced < 0)
    pen = (torch.arange(rows) + seed) % 3 * 0.7
    got_s, got_i = topk_with_rules(logits, lse, k, tiny_cfg, forced, ban_eos, only_eos, pen)
    want_s, want_i = torch.topk(graph_rules(lp, tiny_cfg, forced, ban_eos, only_eos, pen), k, dim=-1)
    torch.testing.assert_close(got_s, want_s, atol=1e-5, rtol=0)
    finite = torch.isfinite(want_s)
    assert torch.equal(got_i[finite], want_i[finite])
