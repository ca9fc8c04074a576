"""Checkpoint formats (shared/DELTALM.md §5) -> the canonical model, checked against forwards
computed independently: transformers for XLM-R, and for DeltaLM / XLM a small functional
reference in this file that reads the RAW checkpoint keys (it does not use export/model.py)."""

from __future__ import annotations

import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import checkpoint_writers as W
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deltalm.config import ModelConfig
from deltalm.errors import CheckpointError
from deltalm.export.checkpoints import (
    UNILM_DELTALM,
    apply_table,
    build_model,
    describe,
    detect_format,
    load_checkpoint,
)
from deltalm.export.model import build_model as build_canonical
from deltalm.export.safe_load import safe_torch_load, to_plain

V = 96  # dictionary size (dict.txt) in these tests
DELTALM = ModelConfig(
    kind="deltalm",
    embed_dim=128,
    ffn_dim=96,
    encoder_layers=2,
    decoder_layers=2,
    heads=2,
    vocab_size=V,
    max_positions=40,
    layernorm_embedding=True,
)
XLMR = ModelConfig(
    kind="xlmr",
    embed_dim=32,
    ffn_dim=64,
    encoder_layers=4,
    decoder_layers=0,
    heads=4,
    vocab_size=V + 1,
    max_positions=40,
    mlm_head="roberta",
)
XLM_CFG = ModelConfig(
    kind="xlm",
    embed_dim=32,
    ffn_dim=128,
    encoder_layers=2,
    decoder_layers=0,
    heads=4,
    vocab_size=V,
    max_positions=48,
    mlm_head="xlm",
    layer_norm_eps=1e-12,
    bos=0,
    eos=1,
    pad=2,
    unk=3,
    first_position=0,
    pad_position=0,
)

# DeltaLM batches: sources left-padded (pad 1, ending in </s> 2), decoder input starts with </s>.
SRC = torch.tensor([[1, 1, 1, 5, 6, 7, 2], [8, 9, 10, 11, 12, 13, 2], [1, 1, 1, 1, 1, 14, 2]])
PREV = torch.tensor([[2, 20, 21, 22, 23], [2, 30, 31, 32, 33], [2, 40, 41, 42, 43]])


@pytest.fixture(scope="module")
def deltalm():
    return W.randomize(build_canonical(DELTALM), seed=11)


@pytest.fixture(scope="module")
def xlmr():
    return W.randomize(build_canonical(XLMR), seed=12)


@pytest.fixture(scope="module")
def xlm():
    return W.randomize(build_canonical(XLM_CFG), seed=13)


@pytest.fixture(scope="module")
def files(tmp_path_factory, deltalm, xlmr, xlm):
    d = tmp_path_factory.mktemp("ckpt")
    return {
        "a_cfg": W.write_fairseq_deltalm(deltalm, d / "checkpoint_best.pt"),
        "a_args": W.write_fairseq_deltalm(deltalm, d / "checkpoint_args.pt", style="args"),
        "b": W.write_unilm_deltalm(deltalm, d / "deltalm-base.pt"),
        "c": W.write_hf_xlmr(xlmr, d / "xlmr-st"),
        "c_bin": W.write_hf_xlmr(xlmr, d / "xlmr-bin", weights="bin"),
        "d": W.write_xlm(xlm, d / "mlm_en.pth"),
        "dir": d,
    }


# --- independent functional references (raw checkpoint keys, plain torch ops) ---------------------


def ln(w, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], eps)


def lin(w, name, x):
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def mha(w, names, q_in, kv_in, heads, blocked):
    """names: (q, k, v, out) projection names; blocked [B or 1, 1, Tq or 1, Tk] True = masked."""
    b, tq, d = q_in.shape
    hd = d // heads
    split = lambda t: t.reshape(b, -1, heads, hd).transpose(1, 2)  # noqa: E731
    q = split(lin(w, names[0], q_in) * hd**-0.5)
    k, v = split(lin(w, names[1], kv_in)), split(lin(w, names[2], kv_in))
    p = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(blocked, float("-inf")), dim=-1)
    return lin(w, names[3], (p @ v).transpose(1, 2).reshape(b, tq, d))


def fairseq_positions(tokens, pad=1):
    mask = tokens.ne(pad).long()
    return torch.cumsum(mask, dim=1) * mask + pad


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / 2**0.5))


# What each DeltaLM format calls its tensors (DELTALM.md §5 A and B).
FAIRSEQ_NAMES = dict(
    enc_tokens="encoder.embed_tokens.weight",
    dec_tokens="decoder.embed_tokens.weight",
    out="decoder.output_projection.weight",
    enc_pos="encoder.embed_positions.weight",
    dec_pos="decoder.embed_positions.weight",
    enc_ln="encoder.layernorm_embedding",
    dec_ln="decoder.layernorm_embedding",
    enc_fc=("fc1", "fc2"),
    dec_ffn_a=("fc3", "fc4"),
    dec_ffn_b=("fc1", "fc2"),
)
UNILM_NAMES = dict(
    enc_tokens="src_embedding.embed_tokens.weight",
    dec_tokens="tgt_embedding.embed_tokens.weight",
    out="tgt_embedding.embed_tokens.weight",
    enc_pos="src_embedding.embed_positions.weight",
    dec_pos="tgt_embedding.embed_positions.weight",
    enc_ln="src_embedding.emb_layer_norm",
    dec_ln="tgt_embedding.emb_layer_norm",
    enc_fc=("ffn.fc1", "ffn.fc2"),
    dec_ffn_a=("ffn_1.fc1", "ffn_1.fc2"),
    dec_ffn_b=("ffn_2.fc1", "ffn_2.fc2"),
)
ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


def reference_deltalm(w, n, src, prev, heads, layers, vocab, eps=1e-5, pad=1):
    """Encoder output [B, S, D] and teacher-forced log-probs [B, T, vocab] of a post-LN DeltaLM
    with the interleaved decoder layer, straight from the checkpoint's tensors ``w``."""
    w = {k: v.float() for k, v in w.items()}
    enc_layers, dec_layers = layers
    src_pad = src.eq(pad)
    x = w[n["enc_tokens"]][src] + w[n["enc_pos"]][fairseq_positions(src, pad)]
    if n["enc_ln"] + ".weight" in w:
        x = ln(w, n["enc_ln"], x, eps)
    x = x * (~src_pad).unsqueeze(-1)
    key_pad = src_pad[:, None, None, :]
    for i in range(enc_layers):
        p = f"encoder.layers.{i}."
        x = ln(
            w, p + "self_attn_layer_norm", x + mha(w, [p + "self_attn." + a for a in ATTN], x, x, heads, key_pad), eps
        )
        fc1, fc2 = (p + f for f in n["enc_fc"])
        x = ln(w, p + "final_layer_norm", x + lin(w, fc2, gelu(lin(w, fc1, x))), eps)
    enc = x
    t = prev.shape[1]
    y = w[n["dec_tokens"]][:vocab][prev] + w[n["dec_pos"]][fairseq_positions(prev, pad)]
    if n["dec_ln"] + ".weight" in w:
        y = ln(w, n["dec_ln"], y, eps)
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)[None, None]
    for i in range(dec_layers):
        p = f"decoder.layers.{i}."
        y = ln(
            w, p + "self_attn_layer_norm", y + mha(w, [p + "self_attn." + a for a in ATTN], y, y, heads, causal), eps
        )
        a_in, a_out = (p + f for f in n["dec_ffn_a"])
        y = ln(w, p + "ffn_layer_norm", y + lin(w, a_out, gelu(lin(w, a_in, y))), eps)
        y = ln(
            w,
            p + "encoder_attn_layer_norm",
            y + mha(w, [p + "encoder_attn." + a for a in ATTN], y, enc, heads, key_pad),
            eps,
        )
        b_in, b_out = (p + f for f in n["dec_ffn_b"])
        y = ln(w, p + "final_layer_norm", y + lin(w, b_out, gelu(lin(w, b_in, y))), eps)
    logits = y @ w[n["out"]][:vocab].T
    return enc, torch.log_softmax(logits, dim=-1)


def reference_xlm(w, tokens, heads, layers, pad=2, eps=1e-12):
    """XLM (facebookresearch/XLM TransformerModel, encoder only): hidden states and MLM logits,
    right-padded batch, positions 0..S-1, padded rows zeroed after the embeddings and every layer."""
    w = {k.removeprefix("module."): v.float() for k, v in w.items()}
    mask = tokens.ne(pad).unsqueeze(-1).float()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    x = w["embeddings.weight"][tokens] + w["position_embeddings.weight"][positions]
    x = ln(w, "layer_norm_emb", x, eps) * mask
    blocked = tokens.eq(pad)[:, None, None, :]
    for i in range(layers):
        names = [f"attentions.{i}.{p}" for p in ("q_lin", "k_lin", "v_lin", "out_lin")]
        x = ln(w, f"layer_norm1.{i}", x + mha(w, names, x, x, heads, blocked), eps)
        x = ln(w, f"layer_norm2.{i}", x + lin(w, f"ffns.{i}.lin2", gelu(lin(w, f"ffns.{i}.lin1", x))), eps)
        x = x * mask
    return x, lin(w, "pred_layer.proj", x)


def raw_torch(path, key):
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_FakeOmegaPickle)[key]


class _FakeOmegaPickle:
    """The tests' own (unrestricted) view of a file written with the fake omegaconf."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            with W.fake_omegaconf():
                return super().find_class(module, name)

    @staticmethod
    def load(f, **kw):
        return _FakeOmegaPickle.Unpickler(f, **kw).load()


# --- A: fairseq fine-tuned DeltaLM ----------------------------------------------------------------


def assert_deltalm_matches(model, weights, names, vocab, atol=2e-5):
    with torch.no_grad():
        enc_ref, lp_ref = reference_deltalm(
            weights, names, SRC, PREV, DELTALM.heads, (DELTALM.encoder_layers, DELTALM.decoder_layers), vocab
        )
        enc, padding = model.encoder(SRC)
        lp = model(SRC, PREV)
    real = ~padding
    assert torch.allclose(enc[real], enc_ref[real], atol=atol)
    assert lp.shape == lp_ref.shape
    assert torch.allclose(lp, lp_ref, atol=atol)


def test_fairseq_checkpoint_with_omegaconf_cfg_matches_reference(files):
    loaded = load_checkpoint(files["a_cfg"], vocab_size=V)
    assert loaded.format == "fairseq-deltalm"
    assert loaded.config.replace(name="") == DELTALM
    assert_deltalm_matches(build_model(loaded), raw_torch(files["a_cfg"], "model"), FAIRSEQ_NAMES, V)


def test_fairseq_cfg_pickles_as_real_omegaconf_objects(files):
    with zipfile.ZipFile(files["a_cfg"]) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    globals_ = {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert {
        "omegaconf.dictconfig.DictConfig",
        "omegaconf.listconfig.ListConfig",
        "omegaconf.nodes.AnyNode",
        "omegaconf.base.ContainerMetadata",
        "omegaconf.base.Metadata",
        "typing.Any",
        "collections.defaultdict",
        "argparse.Namespace",
        "numpy._core.multiarray.scalar",
    } <= globals_


def test_fairseq_cfg_model_args_come_back_as_plain_dicts(files):
    loaded = load_checkpoint(files["a_cfg"])
    assert loaded.metadata["args_from"] == "cfg.model"
    args = loaded.metadata["model_args"]
    assert args["arch"] == "deltalm_base" and args["encoder_embed_dim"] == 128 and args["lr"] == [1e-4]
    cfg = to_plain(safe_torch_load(files["a_cfg"])["cfg"])
    assert cfg["optimization"]["update_freq"] == [1]
    assert cfg["checkpoint"]["best_checkpoint_metric"] == "bleu" and cfg["bpe"] is None


def test_fairseq_checkpoint_with_namespace_args_loads(files):
    loaded = load_checkpoint(files["a_args"], vocab_size=V)
    assert loaded.metadata["args_from"] == "args"
    assert loaded.config.replace(name="") == DELTALM
    assert_deltalm_matches(build_model(loaded), raw_torch(files["a_args"], "model"), FAIRSEQ_NAMES, V)


def test_fp16_checkpoint_reports_its_dtype_and_loads_as_float32(deltalm, tmp_path):
    path = W.write_fairseq_deltalm(deltalm, tmp_path / "fp16.pt", dtype=torch.float16)
    loaded = load_checkpoint(path)
    assert loaded.source_dtype == "float16"
    assert all(t.dtype == torch.float32 for t in loaded.state_dict.values())
    half = deltalm.state_dict()["encoder.layers.0.fc1.weight"].half().float()
    assert torch.equal(loaded.state_dict["encoder.layers.0.fc1.weight"], half)


def test_fairseq_rows_must_match_the_dictionary(files):
    with pytest.raises(CheckpointError, match=f"checkpoint has {V} rows, dict.txt has {V - 1}"):
        load_checkpoint(files["a_cfg"], vocab_size=V - 1)


def test_fairseq_args_the_model_does_not_implement_are_refused(deltalm, tmp_path):
    path = W.write_fairseq_deltalm(deltalm, tmp_path / "preln.pt", encoder_normalize_before=True)
    with pytest.raises(CheckpointError, match="pre-LN encoder layers"):
        load_checkpoint(path)


def test_tied_embeddings_share_one_tensor(files):
    sd = load_checkpoint(files["a_cfg"]).state_dict
    assert sd["decoder.embed_tokens.weight"] is sd["encoder.embed_tokens.weight"]
    assert sd["decoder.output_projection.weight"] is sd["encoder.embed_tokens.weight"]


def test_untied_output_projection_is_refused(deltalm, tmp_path):
    ckpt = W.fairseq_checkpoint(deltalm)
    ckpt["model"]["decoder.output_projection.weight"] = ckpt["model"]["encoder.embed_tokens.weight"] + 1.0
    path = W.save(ckpt, tmp_path / "untied.pt")
    with pytest.raises(
        CheckpointError, match=r"decoder\.output_projection\.weight differs from encoder\.embed_tokens\.weight"
    ):
        load_checkpoint(path)


def test_missing_unexpected_and_wrong_shapes_are_all_named(deltalm, tmp_path):
    ckpt = W.fairseq_checkpoint(deltalm)
    del ckpt["model"]["decoder.layers.1.fc3.bias"]
    ckpt["model"]["encoder.layers.0.adapter.weight"] = torch.zeros(3)
    ckpt["model"]["encoder.layers.1.fc2.bias"] = torch.zeros(5)
    path = W.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing tensors: decoder.layers.1.fc3.bias" in msg
    assert "encoder.layers.0.adapter.weight" in msg
    assert "encoder.layers.1.fc2.bias: checkpoint [5], config expects [128]" in msg


def test_config_override_replaces_fields(files):
    loaded = load_checkpoint(files["a_cfg"], overrides={"heads": 4, "name": "custom"})
    assert loaded.config.heads == 4 and loaded.config.name == "custom"


def test_config_override_that_contradicts_a_tensor_names_it_and_both_shapes(files):
    with pytest.raises(
        CheckpointError, match=r"encoder\.embed_tokens\.weight: checkpoint \[96, 128\], config expects \[96, 64\]"
    ):
        load_checkpoint(files["a_cfg"], overrides={"embed_dim": 64, "heads": 2})


# --- B: unilm pretrained DeltaLM ------------------------------------------------------------------


def test_unilm_checkpoint_matches_reference_truncated_to_the_dictionary(files):
    loaded = load_checkpoint(files["b"], vocab_size=V)
    assert loaded.format == "unilm-deltalm"
    assert loaded.config.replace(name="") == DELTALM  # heads = 128 // 64 (DeltaLM head size)
    weights = raw_torch(files["b"], "weights")
    assert weights["src_embedding.embed_tokens.weight"].shape[0] == V + 7
    assert_deltalm_matches(build_model(loaded), weights, UNILM_NAMES, V)


def test_unilm_rows_are_truncated_to_the_dictionary_size(files):
    raw = raw_torch(files["b"], "weights")["src_embedding.embed_tokens.weight"]
    loaded = load_checkpoint(files["b"], vocab_size=50)
    assert loaded.config.vocab_size == 50
    assert torch.equal(loaded.state_dict["encoder.embed_tokens.weight"], raw[:50])
    assert any("kept the first 50 of 103 rows" in n for n in loaded.notes)


def test_unilm_rows_are_extended_with_zeros_for_a_larger_dictionary(files):
    raw = raw_torch(files["b"], "weights")["src_embedding.embed_tokens.weight"]
    emb = load_checkpoint(files["b"], vocab_size=110).state_dict["encoder.embed_tokens.weight"]
    assert torch.equal(emb[:103], raw) and torch.count_nonzero(emb[103:]) == 0


def test_unilm_without_a_dictionary_keeps_every_row(files):
    assert load_checkpoint(files["b"]).config.vocab_size == V + 7


def reference_unilm_renames(key: str) -> str:
    """The reference loader's renames, in order (DELTALM.md §5 B)."""
    for old, new in [
        (".ffn_1.fc1", ".fc3"),
        (".ffn_1.fc2", ".fc4"),
        (".ffn_2", ""),
        (".ffn.", "."),
        ("emb_layer_norm", "layernorm_embedding"),
    ]:
        key = key.replace(old, new)
    if key.startswith("src_embedding."):
        return "encoder." + key[len("src_embedding.") :]
    if key.startswith("tgt_embedding."):
        return "decoder." + key[len("tgt_embedding.") :]
    return key


def test_unilm_table_agrees_with_the_reference_renames(files):
    weights = raw_torch(files["b"], "weights")
    mapped = apply_table(UNILM_DELTALM, weights)
    for key in weights:
        expected = reference_unilm_renames(key)
        if key == "tgt_embedding.embed_tokens.weight":  # tied to the source table
            assert expected == "decoder.embed_tokens.weight"
            continue
        assert mapped.source[expected] == key
    assert not mapped.problems


def test_unilm_legacy_ffn_order_swaps_the_two_decoder_ffns(files):
    current = load_checkpoint(files["b"], vocab_size=V).state_dict
    legacy = load_checkpoint(files["b"], vocab_size=V, unilm_ffn_order="legacy").state_dict
    for a, b in [("fc1", "fc3"), ("fc2", "fc4")]:
        assert torch.equal(legacy[f"decoder.layers.0.{a}.weight"], current[f"decoder.layers.0.{b}.weight"])
        assert torch.equal(legacy[f"decoder.layers.0.{b}.bias"], current[f"decoder.layers.0.{a}.bias"])
    assert torch.equal(legacy["encoder.layers.0.fc1.weight"], current["encoder.layers.0.fc1.weight"])


def test_unilm_tables_may_differ_in_rows_beyond_the_dictionary(deltalm, tmp_path):
    """The pretrained tables are longer than a fine-tuning dictionary; the rows past it are cut off,
    so a difference there is no reason to refuse the checkpoint."""
    ckpt = W.unilm_checkpoint(deltalm, extra_rows=7)
    ckpt["weights"]["tgt_embedding.embed_tokens.weight"][-1] += 1.0  # a row past the dictionary
    path = W.save(ckpt, tmp_path / "tail.pt")
    loaded = load_checkpoint(path, vocab_size=V)
    assert torch.equal(
        loaded.state_dict["encoder.embed_tokens.weight"], W.canonical(deltalm)["encoder.embed_tokens.weight"]
    )
    with pytest.raises(CheckpointError, match="differs from"):
        load_checkpoint(path)  # without a dictionary every row is kept, so every row must agree


def test_unilm_source_and_target_tables_must_be_equal(deltalm, tmp_path):
    ckpt = W.unilm_checkpoint(deltalm)
    ckpt["weights"]["tgt_embedding.embed_tokens.weight"][5] += 1.0
    with pytest.raises(CheckpointError, match=r"tgt_embedding\.embed_tokens\.weight differs from src_embedding"):
        load_checkpoint(W.save(ckpt, tmp_path / "untied.pt"))


# --- C: Hugging Face XLM-R ------------------------------------------------------------------------

XLMR_LEFT = torch.tensor([[1, 1, 0, 5, 6, 2], [0, 7, 8, 9, 10, 2], [1, 1, 1, 0, 11, 2]])
XLMR_RIGHT = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 7, 8, 9, 10, 2], [0, 11, 2, 1, 1, 1]])


@pytest.fixture(scope="module")
def hf_mlm(files):
    from transformers import XLMRobertaForMaskedLM

    return XLMRobertaForMaskedLM.from_pretrained(str(files["c"]), attn_implementation="eager").eval()


@pytest.mark.parametrize("batch", [XLMR_LEFT, XLMR_RIGHT], ids=["left-padded", "right-padded"])
def test_xlmr_hidden_states_and_mlm_logits_match_transformers(files, hf_mlm, batch):
    from transformers import XLMRobertaModel

    loaded = load_checkpoint(files["c"])
    assert loaded.format == "hf-xlmr" and loaded.config.replace(name="") == XLMR
    model = build_model(loaded)
    hf_base = XLMRobertaModel.from_pretrained(str(files["c"]), attn_implementation="eager").eval()
    mask = batch.ne(1)
    with torch.no_grad():
        hidden, logits = model(batch)
        ref = hf_mlm(input_ids=batch, attention_mask=mask.long(), output_hidden_states=True)
        base = hf_base(input_ids=batch, attention_mask=mask.long()).last_hidden_state
    assert torch.allclose(hidden[mask], ref.hidden_states[-1][mask], atol=1e-5)
    assert torch.allclose(hidden[mask], base[mask], atol=1e-5)
    assert torch.allclose(logits[mask], ref.logits[mask], atol=1e-4)


def test_xlmr_bin_directory_and_weights_file_path_load_the_same(files):
    st = load_checkpoint(files["c"])
    for path in (files["c_bin"], files["c_bin"] / "pytorch_model.bin", files["c"] / "model.safetensors"):
        other = load_checkpoint(path)
        assert other.config == st.config
        assert other.state_dict.keys() == st.state_dict.keys()
        assert all(torch.equal(other.state_dict[k], st.state_dict[k]) for k in st.state_dict)
    notes = " ".join(load_checkpoint(files["c_bin"]).notes)
    assert "roberta.pooler.dense.weight" in notes and "roberta.embeddings.position_ids" in notes


def test_xlmr_token_type_row_is_folded_into_positions(files, xlmr):
    from safetensors.torch import load_file

    raw = load_file(str(files["c"] / "model.safetensors"))
    pos = load_checkpoint(files["c"]).state_dict["encoder.embed_positions.weight"]
    folded = (
        raw["roberta.embeddings.position_embeddings.weight"] + raw["roberta.embeddings.token_type_embeddings.weight"][0]
    )
    assert torch.equal(pos, folded)
    assert torch.allclose(pos, xlmr.state_dict()["encoder.embed_positions.weight"], atol=1e-6)


def test_xlmr_head_that_differs_from_the_embeddings_is_refused(xlmr, tmp_path):
    sd, config = W.hf_state_dict(xlmr)
    sd["lm_head.decoder.weight"] = sd["lm_head.decoder.weight"] + 0.5
    (tmp_path / "m").mkdir()
    config.to_json_file(str(tmp_path / "m" / "config.json"))
    torch.save(sd, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"lm_head\.decoder\.weight differs from roberta\.embeddings\.word_embeddings\.weight"
    ):
        load_checkpoint(tmp_path / "m")


def test_xlmr_seeds_a_deltalm_decoder_from_pairs_of_encoder_layers(files):
    enc = load_checkpoint(files["c"]).state_dict
    loaded = load_checkpoint(files["c"], as_deltalm=True, vocab_size=V)
    sd, cfg = loaded.state_dict, loaded.config
    assert cfg.kind == "deltalm" and cfg.decoder_layers == 2 and cfg.encoder_layers == 4 and cfg.vocab_size == V
    pairs = [
        ("self_attn.q_proj", 0, "self_attn.q_proj"),
        ("self_attn.out_proj", 0, "self_attn.out_proj"),
        ("self_attn_layer_norm", 0, "self_attn_layer_norm"),
        ("fc3", 0, "fc1"),
        ("fc4", 0, "fc2"),
        ("ffn_layer_norm", 0, "final_layer_norm"),
        ("encoder_attn.k_proj", 1, "self_attn.k_proj"),
        ("encoder_attn.v_proj", 1, "self_attn.v_proj"),
        ("encoder_attn_layer_norm", 1, "self_attn_layer_norm"),
        ("fc1", 1, "fc1"),
        ("fc2", 1, "fc2"),
        ("final_layer_norm", 1, "final_layer_norm"),
    ]
    for i in range(2):
        for dec, offset, src in pairs:
            for w in ("weight", "bias"):
                assert torch.equal(
                    sd[f"decoder.layers.{i}.{dec}.{w}"], enc[f"encoder.layers.{2 * i + offset}.{src}.{w}"]
                ), (i, dec)
    for k in ("encoder.layers.3.fc1.weight", "encoder.layernorm_embedding.weight", "encoder.embed_positions.weight"):
        assert torch.equal(sd[k], enc[k])
    assert torch.equal(sd["decoder.embed_positions.weight"], enc["encoder.embed_positions.weight"])
    assert torch.equal(sd["decoder.layernorm_embedding.bias"], enc["encoder.layernorm_embedding.bias"])
    assert torch.equal(sd["encoder.embed_tokens.weight"], enc["encoder.embed_tokens.weight"][:V])
    assert sd["decoder.output_projection.weight"] is sd["encoder.embed_tokens.weight"]
    build_model(loaded)  # strict load succeeds


def test_xlmr_seeding_with_fewer_decoder_layers_and_too_many(files):
    assert load_checkpoint(files["c"], as_deltalm=True, overrides={"decoder_layers": 1}).config.decoder_layers == 1
    with pytest.raises(CheckpointError, match="cannot seed 3 decoder layers from 4 encoder layers"):
        load_checkpoint(files["c"], as_deltalm=True, overrides={"decoder_layers": 3})


# --- D: XLM ---------------------------------------------------------------------------------------

XLM_BATCH = torch.tensor([[0, 5, 6, 7, 1], [0, 8, 9, 1, 2], [0, 10, 1, 2, 2]])  # right-padded, pad 2


@pytest.mark.parametrize("module_prefix", [False, True])
def test_xlm_hidden_states_and_mlm_logits_match_reference(xlm, tmp_path, module_prefix):
    path = W.write_xlm(xlm, tmp_path / "mlm.pth", module_prefix=module_prefix)
    loaded = load_checkpoint(path)
    assert loaded.format == "xlm" and loaded.config.replace(name="") == XLM_CFG
    assert loaded.metadata["id2word"][2] == "<pad>" and loaded.metadata["params"]["emb_dim"] == 32
    with torch.no_grad():
        hidden, logits = build_model(loaded)(XLM_BATCH)
        ref_hidden, ref_logits = reference_xlm(raw_torch(path, "model"), XLM_BATCH, heads=4, layers=2)
    real = XLM_BATCH.ne(2)
    assert torch.allclose(hidden[real], ref_hidden[real], atol=1e-5)
    assert torch.allclose(logits[real], ref_logits[real], atol=1e-4)


def test_xlm_cannot_seed_a_deltalm(files):
    with pytest.raises(CheckpointError, match="cannot seed a DeltaLM"):
        load_checkpoint(files["d"], as_deltalm=True)


# --- detection, describe --------------------------------------------------------------------------


def test_each_format_is_detected(files):
    assert [detect_format(files[k]) for k in ("a_cfg", "a_args", "b", "c", "c_bin", "d")] == [
        "fairseq-deltalm",
        "fairseq-deltalm",
        "unilm-deltalm",
        "hf-xlmr",
        "hf-xlmr",
        "xlm",
    ]


def test_unknown_format_lists_supported_formats_and_keys_seen(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, path)
    with pytest.raises(
        CheckpointError,
        match=r"supported: fairseq-deltalm, unilm-deltalm, hf-xlmr, xlm\); top-level keys: epoch, state_dict",
    ):
        load_checkpoint(path)


def test_describe_reports_format_architecture_and_unique_parameters(files, deltalm):
    info = describe(load_checkpoint(files["a_cfg"]))
    unique = sum(p.numel() for p in deltalm.parameters())  # the tied table counted once
    assert info["format"] == "fairseq-deltalm" and info["parameters"] == unique
    assert info["architecture"]["encoder_layers"] == 2 and info["vocab_size"] == V and info["dtype"] == "float32"
    assert any("encoder.version" in n for n in info["notes"])


def test_build_model_is_in_eval_mode(files):
    assert not build_model(load_checkpoint(files["d"])).training


# --- the restricted loader ------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("how", ["zip", "legacy", "plain-pickle"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, how):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pt"
    payload = {"args": _RunsCode(sentinel), "model": {"w": torch.zeros(2)}}
    if how == "plain-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "zip")
    with pytest.raises(CheckpointError, match=r"(os|posix)\.system") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert not sentinel.exists()


class _LocalClass:
    pass


@pytest.mark.parametrize(
    "obj, name",
    [
        (type("E", (), {"__reduce__": lambda self: (eval, ("1+1",))})(), "builtins.eval"),
        (_LocalClass(), "test_checkpoints._LocalClass"),
    ],
)
def test_other_globals_are_refused_by_name(tmp_path, obj, name):
    path = tmp_path / "x.pt"
    torch.save({"x": obj}, path)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        safe_torch_load(path)


def test_legacy_format_checkpoint_loads(deltalm, tmp_path):
    path = W.save(W.fairseq_checkpoint(deltalm), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert load_checkpoint(path, vocab_size=V).config.replace(name="") == DELTALM


def test_numpy_arrays_pickled_by_numpy_1_load(tmp_path):
    path = tmp_path / "np1.pt"
    torch.save({"counts": np.arange(4.0), "best": np.float64(2.5)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in path.read_bytes()
    out = safe_torch_load(path)
    assert out["counts"].tolist() == [0.0, 1.0, 2.0, 3.0] and out["best"] == 2.5


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, f: d / "missing.pt", "file not found"),
        (lambda d, f: _write(d / "empty.pt", b""), "empty file"),
        (lambda d, f: _truncated(f["a_cfg"], d / "trunc.pt"), "truncated or corrupt zip archive"),
        (
            lambda d, f: _truncated(
                W.save({"w": torch.zeros(64)}, d / "l.pt", _use_new_zipfile_serialization=False), d / "trunc_legacy.pt"
            ),
            "truncated or corrupt PyTorch checkpoint",
        ),
        (lambda d, f: _write(d / "rand.pt", bytes(range(7, 250))), "not a PyTorch checkpoint"),
        (lambda d, f: _write(d / "pkl.pt", b"\x80\x02garbage" * 8), "truncated or corrupt PyTorch checkpoint"),
        (lambda d, f: _zip(d / "notes.zip", {"readme.txt": b"hello"}), "a zip archive but not a PyTorch checkpoint"),
        (lambda d, f: _zip(d / "script.pt", {"m/data.pkl": b"", "m/constants.pkl": b""}), "TorchScript archive"),
        (lambda d, f: f["dir"], "is a directory|not a Hugging Face model"),
    ],
)
def test_files_that_are_not_checkpoints_give_one_precise_line(files, tmp_path, make, message):
    path = make(tmp_path, files)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_a_corrupt_safetensors_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(path)


def test_to_plain_turns_namespaces_and_nested_lists_into_plain_data(tmp_path):
    import argparse

    path = W.save({"cfg": W.to_dictconfig({"a": {"b": [1, {"c": argparse.Namespace(d=2)}]}})}, tmp_path / "c.pt")
    assert to_plain(safe_torch_load(path)["cfg"]) == {"a": {"b": [1, {"c": {"d": 2}}]}}
