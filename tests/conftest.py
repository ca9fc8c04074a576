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
    (sentence, full history). Tracks histories through reorder / sent_index exactly as a real
    backend tracks its caches."""

    def __init__(self, vocab=6, seed=0, max_positions=512, topk=0, temperature_scale=2.0):
        from deltalm.config import ModelConfig

        self.cfg = ModelConfig(kind="deltalm", embed_dim=8, ffn_dim=8, encoder_layers=1, decoder_layers=1,
                               heads=2, vocab_size=vocab, max_positions=max_positions)
        self.seed = seed
        self.topk = topk
        self.scale = temperature_scale
        self.calls = []

    def log_probs(self, sent, hist):
        rng = np.random.default_rng(abs(hash((self.seed, int(sent), tuple(int(t) for t in hist)))) % (2**32))
        logits = rng.normal(size=self.cfg.vocab_size) * self.scale
        logits = logits - logits.max()
        return (logits - np.log(np.exp(logits).sum())).astype(np.float32)

    def encode(self, src):
        return {"src": src, "hist": None}

    def step(self, state, tokens, step, reorder, sent_index, rules, want="topk"):
        rows = len(tokens)
        group = rows // len(sent_index)
        prev = state["hist"] if state["hist"] is not None else [()] * rows
        hist = [prev[reorder[i]] + (int(tokens[i]),) for i in range(rows)]
        state["hist"] = hist
        self.calls.append((step, rows, len(sent_index)))
        lp = np.stack([self.log_probs(sent_index[i // group], hist[i]) for i in range(rows)])
        if want == "logprobs":
            return lp
        from deltalm.search import apply_rules

        ruled = apply_rules(lp, rules, self.cfg.pad, self.cfg.unk, self.cfg.eos)
        ids = np.argsort(-ruled, axis=1, kind="stable")[:, : self.topk]
        return np.take_along_axis(ruled, ids, axis=1), ids


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
    from deltalm.export.onnx_export import export_graphs
    from deltalm.manifest import FORMAT_VERSION, MANIFEST
    from deltalm.atomic import write_json_atomic

    d = tmp_path_factory.mktemp("engines") / "artifact"
    d.mkdir()
    graphs = export_graphs(tiny_model, d, "fp32", 10)
    files = sorted({f for g in graphs.values() for f in g["files"]})
    write_json_atomic(d / MANIFEST, {"format_version": FORMAT_VERSION, "model": tiny_model.cfg.to_dict(),
                                     "precision": "fp32", "graphs": graphs, "files": hash_files(d, files)})
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
