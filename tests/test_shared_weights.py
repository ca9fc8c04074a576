"""One copy of each weight in an artifact: the embedding table is stored once (in weights.data)
and read from there by the encoder's and the step's gathers and by the step's output projection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deltalm.artifact import open_artifact
from deltalm.cli import main as cli


def _export(tiny_ckpt, out: Path, *extra) -> Path:
    ckpt, spm, dct, _ = tiny_ckpt
    assert (
        cli(["export", str(ckpt), "--spm", str(spm), "--dict", str(dct), "--out", str(out), "--no-optimize", *extra])
        == 0
    )
    return out


def _table_readers(path: Path) -> dict[str, tuple[str, int, int]]:
    """Initializer name -> (location, offset, length) of every external initializer of a graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out[t.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
    return out


def _count(haystack: bytes, needle: bytes) -> int:
    n, start = 0, 0
    while (i := haystack.find(needle, start)) >= 0:
        n, start = n + 1, i + 1
    return n


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_an_artifact_holds_one_copy_of_the_embedding_table(tiny_ckpt, tmp_path, precision):
    from deltalm.export.onnx_export import quantize_table

    art = open_artifact(_export(tiny_ckpt, tmp_path / precision, "--precision", precision))
    table = tiny_ckpt[3].encoder.embed_tokens.weight.detach().numpy()
    if precision == "int8":  # int8 artifacts hold the int8 table (one column per token) and no float one
        stored, others = quantize_table(table)[0], [table, np.ascontiguousarray(table.T), quantize_table(table)[0].T]
    else:
        stored = table.astype(np.float16 if precision == "fp16" else np.float32)
        others = [np.ascontiguousarray(stored.T)] + ([table] if precision == "fp16" else [])
    blobs = {name: (art.path / name).read_bytes() for name in art.manifest.files}
    assert sum(_count(b, stored.tobytes()) for b in blobs.values()) == 1
    for other in others:
        assert sum(_count(b, np.ascontiguousarray(other).tobytes()) for b in blobs.values()) == 0
    # every graph that reads the table reads those same bytes: the encoder's gather, the step's
    # gather and the step's output projection
    where = blobs["weights.data"].find(stored.tobytes())
    readers = {}
    for g in ("encoder", "decoder_step"):
        for name, (loc, off, length) in _table_readers(art.graph_path(g)).items():
            if loc == "weights.data" and off == where and length == stored.nbytes:
                readers.setdefault(g, []).append(name)
    assert len(readers["encoder"]) == 1 and len(readers["decoder_step"]) == 2


def test_int8_table_is_a_per_row_quantization_of_the_embedding():
    from deltalm.export.onnx_export import quantize_table

    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 16)).astype(np.float32) * rng.uniform(0.01, 3, size=(50, 1)).astype(np.float32)
    table[7] = 0.0
    q, scale = quantize_table(table)
    assert q.shape == (16, 50) and q.dtype == np.int8 and scale.shape == (50,)
    back = q.T.astype(np.float32) * scale[:, None]
    assert np.all(np.abs(back - table) <= scale[:, None] / 2 + 1e-7)
    assert np.abs(q).max() == 127 and not back[7].any()


def test_int8_export_fails_when_the_int8_embedding_loses_the_tokens(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """The int8 parity verdict covers the embedding: a table that does not represent the tokens
    (every scale 0: all embeddings zero) fails the export, and nothing is written."""
    import dataclasses

    import deltalm.export.weights as W

    zero_scales = dataclasses.replace(W.TRANSFORMS["s8table"], apply=lambda table: np.zeros(table.shape[0], np.float32))
    monkeypatch.setitem(W.TRANSFORMS, "s8table", zero_scales)
    ckpt, spm, dct, _ = tiny_ckpt
    out = tmp_path / "int8"
    assert (
        cli(
            [
                "export",
                str(ckpt),
                "--spm",
                str(spm),
                "--dict",
                str(dct),
                "--out",
                str(out),
                "--no-optimize",
                "--precision",
                "int8",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "parity check failed" in err and "top-1 agreement" in err
    assert not out.exists()
