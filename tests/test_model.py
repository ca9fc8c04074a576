"""The PyTorch rebuild: positions, incremental decoding == teacher-forced forward, grouped
cross-attention, in-graph beam reorder."""
import numpy as np
import pytest
import torch

from deltalm.export.graphs import DecoderStepGraph, EncoderGraph
from deltalm.export.model import make_positions
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


def run_steps(tiny_model, src, prev, group=1, k=10):
    """Feed prev [rows, T] one token at a time through DecoderStepGraph; returns log-probs
    [rows, T, V]. rows = batch * group (hypotheses grouped by sentence)."""
    cfg = tiny_model.cfg
    enc = EncoderGraph(tiny_model)(src)
    step_graph = DecoderStepGraph(tiny_model, k)
    rows = prev.shape[0]
    past = [torch.zeros(rows, cfg.heads, 0, cfg.head_dim)] * (2 * cfg.decoder_layers)
    rules = (torch.full((rows,), -1), torch.tensor(False), torch.tensor(False), torch.tensor(0.0))
    out = []
    for t in range(prev.shape[1]):
        res = step_graph(prev[:, t], torch.tensor(t), torch.arange(rows), torch.arange(src.shape[0]),
                         src.eq(cfg.pad), *past, *enc[1:], *rules)
        out.append(res[2])
        past = list(res[3:])
    return torch.stack(out, dim=1), past


@torch.no_grad()
def test_incremental_decoding_equals_teacher_forced_forward(tiny_model):
    src = left_padded([[5, 6, 7, 8, 9, 2], [10, 11, 2], [12, 2]])
    prev = torch.tensor([[2, 20, 21, 22, 23], [2, 30, 31, 32, 33], [2, 40, 41, 42, 43]])
    full = tiny_model(src, prev)
    inc, past = run_steps(tiny_model, src, prev)
    assert inc.shape == full.shape
    assert torch.allclose(inc, full, atol=1e-5)
    assert past[0].shape == (3, tiny_model.cfg.heads, 5, tiny_model.cfg.head_dim)


@torch.no_grad()
def test_grouped_hypotheses_share_cross_kv_without_changing_results(tiny_model):
    """3 hypotheses per sentence in one step call equal each hypothesis decoded alone."""
    src = left_padded([[5, 6, 7, 8, 9, 2], [10, 11, 2]])
    prev = torch.tensor([[2, 20, 21], [2, 22, 23], [2, 24, 25], [2, 30, 31], [2, 32, 33], [2, 34, 35]])
    grouped, _ = run_steps(tiny_model, src, prev, group=3)
    for r in range(6):
        s = r // 3
        alone = tiny_model(src[s : s + 1, (src[s] != 1).nonzero()[0, 0]:], prev[r : r + 1])
        assert torch.allclose(grouped[r], alone[0], atol=1e-5)


@torch.no_grad()
def test_in_graph_reorder_and_sentence_selection_equal_recomputation(tiny_model):
    cfg = tiny_model.cfg
    src = left_padded([[5, 6, 7, 2], [10, 11, 12, 13, 2]])
    prev = torch.tensor([[2, 20], [2, 21], [2, 30], [2, 31]])  # 2 sentences x 2 hypotheses
    _, past = run_steps(tiny_model, src, prev, group=2)
    enc = EncoderGraph(tiny_model)(src)
    # keep only sentence 1; its two new hypotheses both continue its hypothesis 1 (row 3)
    step_graph = DecoderStepGraph(tiny_model, 10)
    reorder = torch.tensor([3, 3])
    tokens = torch.tensor([40, 41])
    rules = (torch.full((2,), -1), torch.tensor(False), torch.tensor(False), torch.tensor(0.0))
    res = step_graph(tokens, torch.tensor(2), reorder, torch.tensor([1]), src.eq(cfg.pad), *past, *enc[1:], *rules)
    expect = tiny_model(src[1:2], torch.tensor([[2, 31, 40], [2, 31, 41]]) [:, :].contiguous()[:1].expand(1, 3))
    expect0 = tiny_model(src[1:2], torch.tensor([[2, 31, 40]]))[0, -1]
    expect1 = tiny_model(src[1:2], torch.tensor([[2, 31, 41]]))[0, -1]
    assert torch.allclose(res[2][0], expect0, atol=1e-5)
    assert torch.allclose(res[2][1], expect1, atol=1e-5)
    del expect


def test_graph_rules_equal_numpy_rules(tiny_cfg):
    from deltalm.export.graphs import apply_rules as graph_rules
    from deltalm.search import apply_rules as numpy_rules

    rng = np.random.default_rng(0)
    lp = rng.normal(size=(4, tiny_cfg.vocab_size)).astype(np.float32)
    lp[0, 7] = np.nan
    for ban_eos in (False, True):
        for only_eos in (False, True):
            forced = np.array([-1, 9, -1, 4])
            rules = StepRules(ban_eos=ban_eos, only_eos=only_eos, unk_penalty=0.7, forced_tokens=forced)
            a = numpy_rules(lp, rules, tiny_cfg.pad, tiny_cfg.unk, tiny_cfg.eos)
            b = graph_rules(torch.from_numpy(lp), tiny_cfg, torch.from_numpy(forced), torch.tensor(ban_eos),
                            torch.tensor(only_eos), torch.tensor(0.7)).numpy()
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
    lp = torch.log_softmax(logits, dim=-1)
    forced = torch.full((rows,), -1)
    if seed % 3 == 0:
        forced[seed % rows] = tiny_cfg.unk if seed % 2 else 17
    ban_eos, only_eos = torch.tensor(seed % 4 == 1), torch.tensor(seed % 5 == 2)
    pen = torch.tensor(float(seed % 3) * 0.7)
    got_s, got_i = topk_with_rules(lp, k, tiny_cfg, forced, ban_eos, only_eos, pen)
    want_s, want_i = torch.topk(graph_rules(lp, tiny_cfg, forced, ban_eos, only_eos, pen), k, dim=-1)
    torch.testing.assert_close(got_s, want_s, atol=1e-5, rtol=0)
    finite = torch.isfinite(want_s)
    assert torch.equal(got_i[finite], want_i[finite])
