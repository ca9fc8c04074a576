"""Stage 2: export to an artifact directory, parity, and --backend ort against --backend torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import checkpoint_writers as W
import numpy as np
import pytest

from deltalm.artifact import open_artifact
from deltalm.cli import main as cli
from deltalm.config import ModelConfig
from deltalm.options import TranslateOptions
from deltalm.search import generate

ROOT = Path(__file__).resolve().parent.parent


def export(tiny_ckpt, out: Path, *extra: str) -> Path:
    ckpt, spm, dct, _ = tiny_ckpt
    assert cli(["export", str(ckpt), "--spm", str(spm), "--dict", str(dct), "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory) -> tuple[Path, str]:
    """An fp32 export of the tiny checkpoint, and what the command printed on stderr."""
    from cli_support import run_cli

    ckpt, spm, dct, _ = tiny_ckpt
    out = tmp_path_factory.mktemp("art") / "fp32"
    res = run_cli(["export", ckpt, "--spm", spm, "--dict", dct, "--out", out])
    assert res.rc == 0, res.err
    return out, res.err


@pytest.fixture(scope="module")
def artifact(exported):
    return exported[0]


def test_export_writes_a_self_describing_artifact(artifact, tiny_ckpt):
    names = sorted(p.name for p in artifact.iterdir())
    assert names == [
        "decoder_step.onnx",
        "decoder_step_shortlist.onnx",
        "dict.txt",
        "encoder.onnx",
        "manifest.json",
        "parity.json",
        "spm.model",
        "weights.data",
    ]
    art = open_artifact(artifact)  # hash-checks every file
    m = art.manifest.to_dict()
    assert set(m["files"]) == set(names) - {"manifest.json"}
    assert art.config == tiny_ckpt[3].cfg.replace(name="")
    assert m["precision"] == "fp32" and m["vocab"]["size"] == tiny_ckpt[3].cfg.vocab_size
    assert m["source"]["format"] == "fairseq-deltalm"
    assert set(m["versions"]) >= {"torch", "onnx", "onnxruntime"}
    step = art.graph_spec("decoder_step")
    assert step.input_names[:2] == ["tokens", "positions"] and "cache_key_0" in step.input_names
    assert art.manifest.format_version == 2
    assert m["export_options"]["ort_fusions"]["encoder"]  # e.g. SkipLayerNormalization, BiasGelu
    parity = json.loads((artifact / "parity.json").read_text())
    assert parity["passed"] and parity["failures"] == []
    for graph in ("decoder_step", "decoder_step_shortlist"):  # the shortlist step is checked like the full one
        lp = [r for r in parity["graphs"] if r["output"] == "log_probs" and r["graph"] == graph]
        assert len(lp) == 5 and max(r["max_abs"] for r in lp) < 1e-4
        assert {"cache=0", "cache=1", "cache=17"} <= {r["case"].split()[-2] for r in lp}
        assert "new=6" in {r["case"].split()[-1] for r in lp}  # a whole target in one step (scoring)
    assert all(r["identical_ids"] == 1.0 for r in parity["end_to_end"])


def sources(cfg, rng, lengths):
    from deltalm.export.parity import make_sources

    return make_sources(cfg, lengths, rng)


@pytest.mark.parametrize("beam,nbest", [(1, 1), (5, 3)])
def test_ort_backend_gives_the_same_ids_and_scores_as_torch(artifact, tiny_ckpt, beam, nbest):
    from deltalm.backends.ort import OrtBackend
    from deltalm.export.torch_backend import TorchBackend

    model = tiny_ckpt[3]
    torch_b, ort_b = TorchBackend(model), OrtBackend.from_artifact(artifact)
    rng = np.random.default_rng(beam)
    opts = TranslateOptions(beam=beam, nbest=nbest, max_len_a=1.2, max_len_b=5, lenpen=1.0)
    for lengths in [(4,), (12, 3, 7), (1, 30, 9, 2), (20,) * 5]:
        src = sources(model.cfg, rng, lengths)
        a, b = generate(torch_b, src, opts), generate(ort_b, src, opts)
        for ha, hb in zip(a, b):
            assert [h.tokens for h in ha] == [h.tokens for h in hb]
            np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=1e-4)
            np.testing.assert_allclose(ha[0].positional_scores, hb[0].positional_scores, atol=1e-4)


def test_ort_full_log_probs_path_equals_in_graph_topk(artifact, tiny_ckpt):
    from deltalm.backends.ort import OrtBackend

    fast = OrtBackend.from_artifact(artifact)
    full = OrtBackend.from_artifact(artifact)
    full.topk = 0  # forces the search to ask for log-probs and apply the rules itself
    src = sources(tiny_ckpt[3].cfg, np.random.default_rng(0), (9, 4, 15))
    opts = TranslateOptions(beam=4, nbest=4, max_len_b=12, min_len=3, unkpen=0.5)
    a, b = generate(fast, src, opts, prefix=[7]), generate(full, src, opts, prefix=[7])
    assert [[h.tokens for h in s] for s in a] == [[h.tokens for h in s] for s in b]
    assert all(h.tokens[0] == 7 and len(h.tokens) >= 4 for s in a for h in s)


def test_translate_cli_ort_equals_torch_jsonl(artifact, tiny_ckpt, tmp_path, capsysbinary):
    ckpt, spm, dct, _ = tiny_ckpt
    inp = tmp_path / "in.txt"
    inp.write_text("The cat sees the red apple.\n\nEin Kind will frisches Brot.\nUn niño.\n")
    outs = {}
    for name, args in {
        "ort": [str(artifact), "--backend", "ort"],
        "torch": ["--checkpoint", str(ckpt), "--spm", str(spm), "--dict", str(dct), "--backend", "torch"],
    }.items():
        assert (
            cli(
                [
                    "translate",
                    *args,
                    "--input",
                    str(inp),
                    "--beam",
                    "5",
                    "--nbest",
                    "2",
                    "--format",
                    "jsonl",
                    "--max-len-b",
                    "10",
                ]
            )
            == 0
        )
        outs[name] = [json.loads(line) for line in capsysbinary.readouterr().out.decode().splitlines()]
    assert [o["id"] for o in outs["ort"]] == [0, 1, 2, 3]
    assert outs["ort"][1]["nbest"] == []
    for a, b in zip(outs["ort"], outs["torch"]):
        assert [h["tokens"] for h in a["nbest"]] == [h["tokens"] for h in b["nbest"]]
        for ha, hb in zip(a["nbest"], b["nbest"]):
            assert ha["score"] == pytest.approx(hb["score"], abs=1e-4)
            assert ha["tokens"][-1] == 2 and len(ha["positional_scores"]) == len(ha["tokens"])


def test_sampling_and_ngram_blocking_run_on_ort(artifact):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltalm.cli",
            "translate",
            str(artifact),
            "--sampling",
            "--topk",
            "5",
            "--seed",
            "3",
            "--beam",
            "2",
            "--no-repeat-ngram-size",
            "2",
            "--max-len-b",
            "8",
        ],
        input="a b c\nhello\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2


def test_runtime_never_imports_torch(artifact):
    """`deltalm translate DIR --backend ort` with torch made unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import pkgutil, importlib, deltalm, deltalm.backends\n"
        f"for m in pkgutil.walk_packages([{str(ROOT / 'runtime')!r}], 'deltalm.'):\n"  # runtime/ only: not export/ etc.
        "    importlib.import_module(m.name)\n"
        "from deltalm.cli import main\n"
        f"sys.exit(main(['translate', {str(artifact)!r}, '--beam', '3']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input="Die Katze sieht den roten Apfel.\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_exports_report_agreement_with_fp32(tiny_ckpt, tmp_path, precision, caplog, capsys):
    art = export(tiny_ckpt, tmp_path / precision, "--precision", precision)
    # the export states its own verdict, and the quantizer's advice is not passed on
    assert "parity: passed (decisive top-1 agreement >= " in capsys.readouterr().err
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    m = open_artifact(art).manifest.to_dict()
    assert m["precision"] == precision
    dtypes = {t["name"]: t["dtype"] for t in m["graphs"]["decoder_step"]["spec"]["inputs"]}
    assert dtypes["cache_key_0"] == ("float16" if precision == "fp16" else "float32")
    parity = json.loads((art / "parity.json").read_text())
    assert parity["passed"] and parity["thresholds"]["min_top1"] >= 0.95 and parity["thresholds"]["max_abs"] is None
    top1 = [r["top1_agreement"] for r in parity["graphs"] if r["output"] == "topk_ids"]
    assert top1 and min(top1) >= 0.5
    assert {r["beam"] for r in parity["end_to_end"]} == {1, 5}
    out = subprocess.run(
        [sys.executable, "-m", "deltalm.cli", "translate", str(art)],
        input="hello world\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr


def test_weights_live_in_one_shared_file_outside_the_graphs(artifact):
    art = open_artifact(artifact)
    assert "weights.data" in art.manifest.files
    for g in ("encoder", "decoder_step"):
        assert art.manifest.graphs[g].files == (f"{g}.onnx", "weights.data")
        assert (artifact / f"{g}.onnx").stat().st_size < 200_000  # weights are not inline


def test_export_refuses_to_overwrite_without_force(artifact, tiny_ckpt, capsys):
    ckpt, spm, dct, _ = tiny_ckpt
    assert cli(["export", str(ckpt), "--spm", str(spm), "--dict", str(dct), "--out", str(artifact)]) == 2
    assert "already exists" in capsys.readouterr().err
    open_artifact(artifact)  # untouched


def test_encoder_only_xlmr_exports_encoder_and_mlm_logits(tmp_path):
    import torch

    from deltalm.export.model import EncoderModel

    cfg = ModelConfig(
        kind="xlmr",
        embed_dim=32,
        ffn_dim=64,
        encoder_layers=2,
        decoder_layers=0,
        heads=4,
        vocab_size=120,
        mlm_head="roberta",
        layernorm_embedding=True,
    )
    model = W.randomize(EncoderModel(cfg), seed=5)
    hf_dir = W.write_hf_xlmr(model, tmp_path / "xlmr")
    assert cli(["export", str(hf_dir), "--out", str(tmp_path / "art")]) == 0
    art = open_artifact(tmp_path / "art")
    assert not art.has_graph("decoder_step")
    assert art.graph_spec("encoder").output_names == ["encoder_out", "mlm_logits"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(art.graph_path("encoder")), providers=["CPUExecutionProvider"])
    right = np.array([[0, 10, 11, 12, 2], [0, 13, 2, 1, 1]])
    left = np.array([[0, 10, 11, 12, 2], [1, 1, 0, 13, 2]])
    r, lt = sess.run(["encoder_out"], {"src_tokens": right})[0], sess.run(["encoder_out"], {"src_tokens": left})[0]
    np.testing.assert_allclose(r[1, :3], lt[1, 2:], atol=1e-5)
    with torch.no_grad():
        want = model(torch.from_numpy(right))[0].numpy()
    np.testing.assert_allclose(r[0], want[0], atol=1e-5)


def test_export_prints_its_stages_the_verdict_and_a_summary_not_the_table(exported):
    out, err = exported
    lines = err.splitlines()
    starts = [
        "loaded fairseq-deltalm checkpoint",
        "exported encoder",
        "listed ONNX Runtime's fusions",
        "end to end, beam 1",
        "end to end, beam 5",
        "end to end, teacher-forced 21 steps x 16 sentences",
        "end to end sources: 16 sentences sampled from spm.model",
        "parity: passed",
        "parity summary: 100 outputs compared over 14 graph cases; largest difference",
        f"wrote {out}",
    ]
    assert len(lines) == len(starts) and all(line.startswith(s) for line, s in zip(lines, starts)), "\n".join(lines)
    assert lines[-2].endswith(f"; every output and case in {out / 'parity.json'} (--verbose prints the table)")
    assert "max_rel" not in err


def test_parity_verbose_prints_the_table_and_what_its_columns_mean(artifact):
    from cli_support import run_cli

    quiet = run_cli(["parity", artifact])
    assert quiet.rc == 0, quiet.err
    assert "max_rel" not in quiet.out.decode() and "parity: passed" in quiet.out.decode()
    res = run_cli(["parity", artifact, "--verbose"])
    assert res.rc == 0, res.err
    text = res.out.decode()
    assert text.splitlines()[0].split() == ["graph", "output", "case", "max_abs", "max_rel", "ids/top1"]
    assert "ids/top1: the share of the in-graph top-k ids equal to PyTorch's" in text
    assert "max_rel is for information" in text


def test_the_library_export_is_silent_unless_logging_is_configured(tiny_ckpt, tmp_path):
    ckpt, spm, dct, _ = tiny_ckpt
    code = f"""
import logging, sys
from deltalm.export import check_parity, export_checkpoint
export_checkpoint({str(ckpt)!r}, {str(tmp_path / "a")!r}, spm={str(spm)!r}, dictionary={str(dct)!r}, optimize=False)
print("exported", file=sys.stderr, flush=True)
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
check_parity({str(tmp_path / "a")!r})
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    before, after = done.stderr.split("exported\n")
    assert before == ""  # nothing at all while the library exported
    assert "deltalm.export.pipeline: parity: passed" in after  # and everything through logging once asked


def test_an_int8_export_prints_each_line_once(tiny_ckpt, tmp_path):
    """ONNX Runtime's quantizer configures the root logger; the command's lines must not go there too."""
    from cli_support import DELTALM, ENV

    ckpt, spm, dct, _ = tiny_ckpt
    done = subprocess.run(
        [
            str(DELTALM),
            "export",
            str(ckpt),
            "--spm",
            str(spm),
            "--dict",
            str(dct),
            "--out",
            str(tmp_path / "q"),
            "--precision",
            "int8",
            "--no-optimize",
            "--allow-parity-failure",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("loaded ") and lines[-1].startswith(f"wrote {tmp_path / 'q'}")
    assert len(lines) == len(set(lines)) and not any(line.startswith("INFO:") for line in lines), done.stderr
