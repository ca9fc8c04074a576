import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# the record of verified artifact files (deltalm.artifact.VerifiedFiles) of this test session only
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="deltalm-test-cache-")


@pytest.fixture(scope="session")
def tiny_cfg():
    from deltalm.config import ModelConfig

    return ModelConfig.from_name("tiny").replace(vocab_size=97)


def randomize(model, seed: int = 0, std: float = 0.2):
    """Random normal weights everywhere (LayerNorms and biases included), so that no parameter
    is trivially zero or one and a wrong mapping shows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    from deltalm.export.model import DeltaLM

    return randomize(DeltaLM(tiny_cfg), seed=1)


class FakeBackend:
    """A 'model' small enough to enumerate: the log-probs of a row are a fixed random function of
    (source, full history). It keeps no state: like a real step graph it reads each row's history
    from the cache the search hands it (each cached "key" is the token fed at that position) and
    each sentence's source from its cross K/V, so a wrong reorder, write or retirement of the
    search's batch changes its answers."""

    def __init__(self, vocab=6, seed=0, max_positions=512, topk=0, temperature_scale=2.0):
        from deltalm.backends import BatchLimits
        from deltalm.config import ModelConfig
        from deltalm.graphs import decoder_step_spec

        self.cfg = ModelConfig(
            kind="deltalm",
            embed_dim=2,
            ffn_dim=2,
            encoder_layers=1,
            decoder_layers=1,
            heads=2,
            vocab_size=vocab,
            max_positions=max_positions,
        )
        self.seed = seed
        self.topk = topk
        self.scale = temperature_scale
        self.step_spec = decoder_step_spec(self.cfg, min(max(topk, 1), vocab))
        self.float_dtype = np.dtype(np.float32)
        self.limits = BatchLimits()
        self.calls = []  # (positions of the rows, rows, sentences) per step

    def log_probs(self, src, hist):
        """src: the source ids (no padding); hist: the tokens fed so far, leading </s> included."""
        key = (self.seed, tuple(int(t) for t in src), tuple(int(t) for t in hist))
        rng = np.random.default_rng(abs(hash(key)) % (2**32))
        logits = rng.normal(size=self.cfg.vocab_size) * self.scale
        logits = logits - logits.max()
        return (logits - np.log(np.exp(logits).sum())).astype(np.float32)

    def encode(self, src):
        from deltalm.backends import Encoded

        src = np.asarray(src, dtype=np.int64)
        cross = np.repeat(src.astype(np.float32)[:, None, :, None], 2, axis=1)  # [B, 2, S, 1]: the source ids
        return Encoded(cross=[cross, cross.copy()], padding=src == self.cfg.pad)

    def close(self):
        pass

    def run_step(self, feeds):
        from deltalm.backends import StepOutput
        from deltalm.search import StepRules, apply_rules

        cfg = self.cfg
        tokens, positions = feeds["tokens"], feeds["positions"]
        rows, new_len = tokens.shape
        sents = feeds["src_padding"].shape[0]
        group = rows // sents
        cache, cross, padding = feeds["cache_key_0"], feeds["cross_key_0"], feeds["src_padding"]
        self.calls.append((positions.tolist(), rows, sents))
        lp = np.empty((rows, new_len, cfg.vocab_size), dtype=np.float32)
        for r in range(rows):
            s = r // group
            src = [int(t) for t, pad in zip(cross[s, 0, :, 0], padding[s]) if not pad]
            hist = [int(t) for t in cache[r, 0, : positions[r], 0]]
            for t in range(new_len):
                hist.append(int(tokens[r, t]))
                lp[r, t] = self.log_probs(src, hist)
        rules = StepRules(feeds["forced_tokens"], feeds["ban_eos"], feeds["only_eos"], feeds["unk_penalty"])
        k = self.step_spec.outputs[0].shape[-1]
        topk_scores = np.empty((rows, new_len, k), dtype=np.float32)
        topk_ids = np.empty((rows, new_len, k), dtype=np.int64)
        for t in range(new_len):
            ruled = apply_rules(lp[:, t], rules, cfg.pad, cfg.unk, cfg.eos)
            ids = np.argsort(-ruled, axis=1, kind="stable")[:, :k]
            topk_ids[:, t], topk_scores[:, t] = ids, np.take_along_axis(ruled, ids, axis=1)
        new = np.repeat(tokens.astype(np.float32)[:, None, :, None], 2, axis=1)  # [rows, 2, T, 1]
        return StepOutput(
            topk_scores=topk_scores,
            topk_ids=topk_ids,
            token_scores=np.take_along_axis(lp, feeds["score_ids"], axis=2),
            log_probs=lp if feeds["want_log_probs"] else lp[:, :, :0],
            new_kv=[new, new.copy()],
        )


@pytest.fixture
def fake_backend():
    return FakeBackend


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The demo model fitted briefly, exported once per session (tests/cli_support.py)."""
    from cli_support import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tok(tiny):
    from deltalm.tokenizer import Tokenizer

    return Tokenizer(tiny.spm, tiny.dict)


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory, tiny_model):
    """A real fp32 artifact of the tiny model: graphs and manifest, no tokenizer (engines need none)."""
    from deltalm.artifact import hash_files
    from deltalm.atomic import write_json_atomic
    from deltalm.export.onnx_export import export_graphs
    from deltalm.manifest import FORMAT_VERSION, MANIFEST

    d = tmp_path_factory.mktemp("engines") / "artifact"
    d.mkdir()
    graphs = export_graphs(tiny_model, d, "fp32", 10)
    files = sorted({f for g in graphs.values() for f in g["files"]})
    write_json_atomic(
        d / MANIFEST,
        {
            "format_version": FORMAT_VERSION,
            "model": tiny_model.cfg.to_dict(),
            "precision": "fp32",
            "graphs": graphs,
            "files": hash_files(d, files),
        },
    )
    return d


@pytest.fixture
def artifact_copy(artifact_dir, tmp_path):
    """A copy of ``artifact_dir`` that a test may change."""
    import shutil

    d = tmp_path / "artifact"
    shutil.copytree(artifact_dir, d)
    return d


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random tiny DeltaLM as a real fairseq checkpoint (cfg as an omegaconf DictConfig), with the
    toy tokenizer. Returns (checkpoint, spm, dict, model)."""
    import checkpoint_writers as W

    from deltalm.config import ModelConfig
    from deltalm.export.model import DeltaLM
    from deltalm.export.toy_data import build_toy_tokenizer
    from deltalm.tokenizer import Dictionary

    work = tmp_path_factory.mktemp("tiny")
    spm, dct = build_toy_tokenizer(work)
    cfg = ModelConfig.from_name("tiny").replace(vocab_size=len(Dictionary.load(dct)))
    model = W.randomize(DeltaLM(cfg), seed=3)
    ckpt = W.write_fairseq_deltalm(model, work / "checkpoint_best.pt")
    return ckpt, spm, dct, model
