"""DeltaLM in plain PyTorch: one definition for the full (teacher-forced) forward and the cached
decoder step, plus the encoder-only models of its family (XLM-R, XLM).

Semantics follow ``shared/DELTALM.md``: post-LN layers, learned positions with fairseq's offset
and left-padding rule, optional ``layernorm_embedding``, exact-erf GELU, the interleaved decoder
layer (self-attn, fc3/fc4, cross-attn, fc1/fc2), tied output projection without bias.

Parameter names equal the keys of a fairseq fine-tuned DeltaLM checkpoint (format A), so that
format maps by identity and every other format maps onto these names.

Shapes: ``B`` sentences, ``N`` decoder rows (hypotheses; ``N = B * G`` with ``G`` hypotheses per
sentence, grouped by sentence), ``S`` source length, ``T`` target length, ``P`` past length,
``H`` heads, ``hd`` head size, ``D`` model size, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltalm.config import ModelConfig


def make_positions(tokens: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """fairseq ``make_positions``: the k-th real token of a row (k from 1) gets
    ``first_position + k - 1``; pad tokens get ``pad_position``. [B, S] int64 -> [B, S] int64."""
    real = tokens.ne(cfg.pad).to(torch.int64)
    index = torch.cumsum(real, dim=1) - 1 + cfg.first_position
    return index * real + (1 - real) * cfg.pad_position


class Attention(nn.Module):
    """Multi-head attention with fairseq's parameter names (q/k/v/out_proj)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, D] -> [B, H, T, hd]
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, H, T, hd], scaled after the bias as fairseq does."""
        return self._split(self.q_proj(x) * self.scaling)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, D] -> key, value [B, H, T, hd]."""
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        """q [B, H, Tq, hd], k/v [B, H, Tk, hd], blocked: bool broadcastable to [B, H, Tq, Tk]
        (True = may not attend) -> [B, H, Tq, hd]. Softmax in float32."""
        scores = torch.matmul(q, k.transpose(-1, -2))
        if blocked is not None:
            scores = scores.masked_fill(blocked, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(probs, v)

    def attend_cached(
        self,
        q: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        cache_blocked: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        blocked: torch.Tensor,
    ) -> torch.Tensor:
        """Self-attention over a row's cached keys and its new ones: q / k / v [N, H, T, hd] of the
        new tokens, cache_k / cache_v [N, H, L, hd] (the caller's cache, never written here),
        cache_blocked bool broadcastable to [N, H, T, L] (True: not one of the row's tokens),
        blocked [T, T] (causal) -> [N, H, T, hd]. The keys are joined for one product, as fairseq
        computes it: two products summed would round differently and, on near-ties, choose
        other tokens than fairseq (measured); the joined copy lives for one layer at a time."""
        cached = cache_k.shape[2]
        scores = torch.matmul(q, torch.cat([cache_k, k], dim=2).transpose(-1, -2))
        scores = torch.cat(
            [
                scores[..., :cached].masked_fill(cache_blocked, float("-inf")),
                scores[..., cached:].masked_fill(blocked, float("-inf")),
            ],
            dim=-1,
        )
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(probs, torch.cat([cache_v, v], dim=2))

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, hd] -> out_proj([B, T, D])."""
        b, _, t, _ = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class FeedForward(nn.Module):
    """Holds no parameters itself: fc_in -> exact GELU -> fc_out, shared by every FFN."""

    @staticmethod
    def apply(fc_in: nn.Linear, fc_out: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return fc_out(F.gelu(fc_in(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, eps = cfg.embed_dim, cfg.layer_norm_eps
        self.self_attn = Attention(d, cfg.heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], blocked [B, 1, 1, S] (source padding) -> [B, S, D]."""
        a = self.self_attn
        k, v = a.project_kv(x)
        x = self.self_attn_layer_norm(x + a.merge(a.attend(a.project_q(x), k, v, blocked)))
        return self.final_layer_norm(x + FeedForward.apply(self.fc1, self.fc2, x))


class DecoderLayer(nn.Module):
    """DeltaLM's interleaved decoder layer: self-attn, FFN (fc3/fc4), cross-attn, FFN (fc1/fc2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, eps = cfg.embed_dim, cfg.ffn_dim, cfg.layer_norm_eps
        self.self_attn = Attention(d, cfg.heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.fc3 = nn.Linear(d, f)
        self.fc4 = nn.Linear(f, d)
        self.ffn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.encoder_attn = Attention(d, cfg.heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        cache_blocked: torch.Tensor,
        blocked: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        cross_blocked: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, T, D] (T new tokens per row); cache_k/v [N, H, L, hd] (the row's earlier tokens;
        L may be 0), cache_blocked bool broadcastable to [N, H, T, L] (True: not one of the row's
        tokens), blocked [T, T] (causal among the new tokens); cross_k/v [B, H, S, hd] with
        N = B * G rows grouped by sentence; cross_blocked [B, 1, 1, S].
        Returns x [N, T, D] and the new tokens' self-attention keys/values [N, H, T, hd]."""
        sa = self.self_attn
        k, v = sa.project_kv(x)
        attended = sa.attend_cached(sa.project_q(x), cache_k, cache_v, cache_blocked, k, v, blocked)
        x = self.self_attn_layer_norm(x + sa.merge(attended))
        x = self.ffn_layer_norm(x + FeedForward.apply(self.fc3, self.fc4, x))
        x = self.encoder_attn_layer_norm(x + self._cross_attend(x, cross_k, cross_v, cross_blocked))
        x = self.final_layer_norm(x + FeedForward.apply(self.fc1, self.fc2, x))
        return x, k, v

    def _cross_attend(self, x, cross_k, cross_v, cross_blocked):
        # The G hypotheses of a sentence share its cross K/V: fold them into the query length
        # ([N, H, T, hd] -> [B, H, G*T, hd]) instead of copying K/V per hypothesis.
        ca = self.encoder_attn
        n, t, _ = x.shape
        b = cross_k.shape[0]
        q = ca.project_q(x)  # [N, H, T, hd]
        q = q.reshape(b, -1, ca.heads, t, ca.head_dim).transpose(1, 2)  # [B, H, G, T, hd]
        q = q.reshape(b, ca.heads, -1, ca.head_dim)  # [B, H, G*T, hd]
        o = ca.attend(q, cross_k, cross_v, cross_blocked)  # [B, H, G*T, hd]
        o = o.reshape(b, ca.heads, -1, t, ca.head_dim).transpose(1, 2)  # [B, G, H, T, hd]
        o = o.reshape(n, ca.heads, t, ca.head_dim)
        return ca.merge(o)


class _Embedded(nn.Module):
    """Token + learned position embeddings, then the optional ``layernorm_embedding``.
    Attributes carry fairseq's names (``embed_tokens``, ``embed_positions``, ``layernorm_embedding``)."""

    def _init_embedding(self, cfg: ModelConfig, embed_tokens: nn.Embedding) -> None:
        self.cfg = cfg
        self.embed_tokens = embed_tokens
        self.embed_positions = nn.Embedding(cfg.position_rows, cfg.embed_dim)
        self.layernorm_embedding = (
            nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps) if cfg.layernorm_embedding else None
        )

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens) + self.embed_positions(positions)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return x


class Encoder(_Embedded):
    """Token ids (left- or right-padded) -> hidden states. No final LayerNorm."""

    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self._init_embedding(cfg, embed_tokens)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))

    def forward(self, src_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src_tokens [B, S] int64 -> (hidden [B, S, D], padding mask [B, S] bool)."""
        padding = src_tokens.eq(self.cfg.pad)
        x = self.embed(src_tokens, make_positions(src_tokens, self.cfg))
        x = x * (~padding).unsqueeze(-1).to(x.dtype)  # fairseq zeroes pad rows after the embedding
        blocked = padding[:, None, None, :]
        for layer in self.layers:
            x = layer(x, blocked)
        return x, padding


class Decoder(_Embedded):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self._init_embedding(cfg, embed_tokens)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        # Tied to the token embeddings (no bias); a checkpoint with an untied projection keeps its own.
        self.output_projection = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        self.output_projection.weight = embed_tokens.weight

    def cross_kv(self, encoder_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """encoder_out [B, S, D] -> per layer (key, value) [B, H, S, hd], computed once per source."""
        return [layer.encoder_attn.project_kv(encoder_out) for layer in self.layers]

    def run_layers(self, x, cache, cache_blocked, blocked, cross, cross_blocked):
        new = []
        for layer, (ck, cv), (xk, xv) in zip(self.layers, cache, cross):
            x, k, v = layer(x, ck, cv, cache_blocked, blocked, xk, xv, cross_blocked)
            new.append((k, v))
        return x, new

    def forward(self, prev_tokens, cross, src_padding):
        """Teacher-forced: prev_tokens [B, T] (starting with </s>) -> hidden [B, T, D]."""
        b, t = prev_tokens.shape
        x = self.embed(prev_tokens, make_positions(prev_tokens, self.cfg))
        empty = cross[0][0].new_zeros(b, self.cfg.heads, 0, self.cfg.head_dim)
        cache_blocked = torch.zeros(1, 1, 1, 0, dtype=torch.bool, device=prev_tokens.device)
        causal = torch.ones(t, t, dtype=torch.bool, device=prev_tokens.device).triu(1)
        x, _ = self.run_layers(
            x, [(empty, empty)] * len(self.layers), cache_blocked, causal, cross, src_padding[:, None, None, :]
        )
        return x

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        cross: list[tuple[torch.Tensor, torch.Tensor]],
        src_padding: torch.Tensor,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """New tokens of many rows, each row at its own position.

        tokens [N, T] int64; positions [N] int64 (tokens already in the row's cache: the token
        fed at step t sits at position t + first_position); cache per layer (k, v) [N, H, L, hd],
        valid at [0, positions); cross per layer (k, v) [B, H, S, hd] with N = B * G;
        src_padding [B, S] bool. Returns hidden [N, T, D] and per layer the new tokens' (k, v)
        [N, H, T, hd]. With an empty cache and all positions 0 this is the teacher-forced pass
        over a target without padding."""
        t = tokens.shape[1]
        offsets = torch.arange(t, dtype=torch.int64, device=tokens.device)
        pos = positions.unsqueeze(1) + offsets.unsqueeze(0) + self.cfg.first_position  # [N, T]
        # Rows of the [V, D] table, as the encoder reads them: the exporter stores the table once
        # for both graphs and computes the projection from the same bytes (``onnx_export``).
        x = F.embedding(tokens, self.output_projection.weight) + self.embed_positions(pos)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        cached = torch.arange(cache[0][0].shape[2], dtype=torch.int64, device=tokens.device)
        cache_blocked = (cached.unsqueeze(0) >= positions.unsqueeze(1))[:, None, None, :]  # [N, 1, 1, L]
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        return self.run_layers(x, cache, cache_blocked, causal, cross, src_padding[:, None, None, :])

    def project(self, hidden: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., D] -> logits [..., V] (with candidates [C], a vocabulary shortlist: [..., C],
        column j for token candidates[j], computed from those rows of the table only)."""
        table = self.output_projection.weight
        if candidates is not None:
            table = table.index_select(0, candidates)
        return torch.matmul(hidden, table.t())


class DeltaLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.is_encoder_decoder:
            raise ValueError(f"DeltaLM needs kind 'deltalm', got {cfg.kind!r}")
        self.cfg = cfg
        enc_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.encoder = Encoder(cfg, enc_tokens)
        self.decoder = Decoder(cfg, enc_tokens)  # shared embeddings (share_all_embeddings)

    def forward(self, src_tokens: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-probs [B, T, V] float32."""
        enc, padding = self.encoder(src_tokens)
        x = self.decoder(prev_tokens, self.decoder.cross_kv(enc), padding)
        return torch.log_softmax(self.decoder.project(x).float(), dim=-1)


class MLMHead(nn.Module):
    """XLM-R: dense -> GELU -> LayerNorm -> tied projection + bias. XLM: tied projection + bias."""

    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.kind = cfg.mlm_head
        self.embed_tokens = [embed_tokens]  # a list: not registered twice as a submodule
        if self.kind == "roberta":
            self.dense = nn.Linear(cfg.embed_dim, cfg.embed_dim)
            self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "roberta":
            x = self.layer_norm(F.gelu(self.dense(x)))
        return F.linear(x, self.embed_tokens[0].weight, self.bias)


class EncoderModel(nn.Module):
    """Encoder-only member of the family (XLM-R, XLM): hidden states and optional MLM logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.is_encoder_decoder:
            raise ValueError("EncoderModel is for encoder-only configs")
        self.cfg = cfg
        self.encoder = Encoder(cfg, nn.Embedding(cfg.vocab_size, cfg.embed_dim))
        self.mlm_head = MLMHead(cfg, self.encoder.embed_tokens) if cfg.mlm_head else None

    def forward(self, src_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, _ = self.encoder(src_tokens)
        return hidden, (self.mlm_head(hidden) if self.mlm_head is not None else None)


def build_model(cfg: ModelConfig) -> nn.Module:
    return DeltaLM(cfg) if cfg.is_encoder_decoder else EncoderModel(cfg)
