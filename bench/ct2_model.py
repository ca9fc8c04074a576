"""A CTranslate2 model with the same FLOPs per token as a DeltaLM, for ``deltalm bench --compare
ctranslate2``: a standard post-norm transformer (CTranslate2's spec API) with DeltaLM's embed
dim, heads, layers, vocabulary, positions and GELU, seeded random weights.

DeltaLM's interleaved decoder layer has two FFNs (self-attention, FFN, cross-attention, FFN);
a standard decoder layer has one, so the FLOP-identical standard layer's FFN is twice as wide
(2 x ffn_dim): the same multiply-adds per token, in one pair of matrices instead of two. The
encoder is the same layer in both. Embedding, output projection and the two tables are tied as
in DeltaLM (CTranslate2 stores a tied table once)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# CTranslate2's compute type per precision of ours
COMPUTE_TYPES = {"fp32": "float32", "int8": "int8"}


def ct2_vocabulary(vocab_size: int) -> list[str]:
    """Token strings whose index is our id: fairseq's four specials, then ``t4`` .. ``tN``."""
    return ["<s>", "<pad>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, vocab_size)]


def build_ct2_spec(cfg, seed: int = 0, std: float = 0.02):
    """The CTranslate2 TransformerSpec of the FLOP-identical standard transformer of ``cfg``
    (a deltalm.config.ModelConfig), weights N(0, std), biases 0, LayerNorms 1 / 0."""
    from ctranslate2.specs import common_spec, transformer_spec

    rng = np.random.default_rng(seed)
    d, v = cfg.embed_dim, cfg.vocab_size

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    def linear(spec, out_dim, in_dim):
        spec.weight = normal(out_dim, in_dim)
        spec.bias = np.zeros(out_dim, np.float32)

    def norm(spec):
        spec.gamma = np.ones(d, np.float32)
        spec.beta = np.zeros(d, np.float32)

    def attention(spec, self_attention: bool):
        if self_attention:
            linear(spec.linear[0], 3 * d, d)  # fused Q, K, V
        else:
            linear(spec.linear[0], d, d)  # Q
            linear(spec.linear[1], 2 * d, d)  # fused K, V of the source
        linear(spec.linear[-1], d, d)
        norm(spec.layer_norm)

    def ffn(spec, width):
        linear(spec.linear_0, width, d)
        linear(spec.linear_1, d, width)
        norm(spec.layer_norm)

    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.encoder_layers, cfg.decoder_layers),
        cfg.heads,
        pre_norm=False,
        activation=common_spec.Activation.GELU,
        layernorm_embedding=cfg.layernorm_embedding,
    )
    table = normal(v, d)
    positions = normal(cfg.max_positions, d)
    for side in (spec.encoder, spec.decoder):
        emb = side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings
        emb.weight = table
        side.position_encodings.encodings = positions
        side.scale_embeddings = True
        if cfg.layernorm_embedding:
            norm(side.layernorm_embedding)
    spec.decoder.projection.weight = table
    spec.decoder.projection.bias = np.zeros(v, np.float32)
    for layer in spec.encoder.layer:
        attention(layer.self_attention, True)
        ffn(layer.ffn, cfg.ffn_dim)
    for layer in spec.decoder.layer:
        attention(layer.self_attention, True)
        attention(layer.attention, False)
        ffn(layer.ffn, 2 * cfg.ffn_dim)  # DeltaLM's two FFNs per decoder layer
    vocab = ct2_vocabulary(v)
    spec.register_source_vocabulary(vocab)
    spec.register_target_vocabulary(vocab)
    return spec


def build_ct2_model(cfg, out_dir: Path, precision: str, seed: int = 0) -> Path:
    """Write the CTranslate2 model of ``cfg`` at ``precision`` (fp32 | int8) into ``out_dir``
    (cached: kept when its record, written last, says the same config, precision and seed)."""
    out_dir = Path(out_dir)
    record = {"config": cfg.to_dict(), "precision": precision, "seed": seed}
    stamp = out_dir / "bench_record.json"
    if stamp.exists() and json.loads(stamp.read_text()) == record:
        return out_dir
    spec = build_ct2_spec(cfg, seed)
    spec.validate()
    spec.optimize(quantization=None if precision == "fp32" else COMPUTE_TYPES[precision])
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    spec.save(str(out_dir))
    stamp.write_text(json.dumps(record))
    return out_dir


def ct2_step_flops_per_token(cfg) -> dict:
    """Multiply-adds per target token of the matrix products (attention score products aside):
    ours (DeltaLM decoder: self-attention, FFN, cross-attention Q / out, FFN) against the
    standard decoder with one FFN of twice the width. Equal by construction."""
    d, f, n = cfg.embed_dim, cfg.ffn_dim, cfg.decoder_layers
    deltalm = n * (4 * d * d + 2 * d * d + 2 * (2 * d * f)) + cfg.vocab_size * d
    standard = n * (4 * d * d + 2 * d * d + 2 * d * (2 * f)) + cfg.vocab_size * d
    return {"deltalm": deltalm, "standard": standard}
