"""Reliability through the real command (issue 6): every bad input is one line naming the problem
and the file, exit code 2, no traceback (unless --debug) and nothing written; an export or a
translation killed at any point leaves the previous result or nothing.

All runs use the tiny demo model (fitted for a few steps), built and exported once per session."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from cli_support import DELTALM, ENV, FAST, ROOT, assert_one_line_error, run_cli

from deltalm.artifact import MANIFEST, open_artifact
from deltalm.atomic import clean_stale_work_dirs, previous_artifact_of, work_dir_name
from deltalm.errors import ArtifactError, DeltaLMError
from deltalm.export.toy_data import toy_corpus


@pytest.fixture
def artifact(tiny, tmp_path) -> Path:
    """A private copy of the tiny artifact, to damage."""
    return Path(shutil.copytree(tiny.artifact, tmp_path / "artifact"))


def export_argv(tiny, checkpoint=None, spm=None, dict_path=None, out=None) -> list:
    return [
        "export",
        checkpoint or tiny.checkpoint,
        "--spm",
        spm or tiny.spm,
        "--dict",
        dict_path or tiny.dict,
        "--out",
        out,
        "--no-optimize",
    ]


def assert_export_fails(tiny, tmp_path, *fragments, **files) -> str:
    """``deltalm export`` with ``files`` swapped in fails with one line holding ``fragments``, and
    creates nothing: not the artifact, not even its parent directory."""
    site = tmp_path / "site"
    res = run_cli(export_argv(tiny, out=site / "artifact", **files))
    message = assert_one_line_error(res, *fragments)
    assert not site.exists()
    return message


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- checkpoints ----------------------------------------------------------------------------------


def load_toy(tiny) -> dict:
    return torch.load(tiny.checkpoint, map_location="cpu", weights_only=False)  # our own file


def test_missing_checkpoint(tiny, tmp_path):
    path = tmp_path / "nowhere.pt"
    assert_export_fails(tiny, tmp_path, f"{path}: no such checkpoint file", checkpoint=path)


def test_empty_checkpoint(tiny, tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert_export_fails(tiny, tmp_path, f"{path}: empty file, not a checkpoint", checkpoint=path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_checkpoint(tiny, tmp_path, zip_format):
    whole = tmp_path / "whole.pt"
    torch.save(load_toy(tiny), whole, _use_new_zipfile_serialization=zip_format)
    path = tmp_path / "truncated.pt"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    assert_export_fails(tiny, tmp_path, f"{path}: truncated or corrupt", checkpoint=path)


def test_file_that_is_not_a_checkpoint(tiny, tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("checkpoint_best.pt was here\n")
    assert_export_fails(
        tiny, tmp_path, f"{path}: not a PyTorch checkpoint (starts with bytes 63 68 65 63", checkpoint=path
    )


def test_zip_that_is_not_a_torch_archive(tiny, tmp_path):
    import zipfile

    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/weights.npy", b"\x93NUMPY")
    assert_export_fails(
        tiny, tmp_path, f"{path}: a zip archive but not a PyTorch checkpoint (no data.pkl)", checkpoint=path
    )


class RunsCode:
    """Unpickling this would run a shell command (creating ``sentinel``)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", ["os.system", "a pickled module"])
def test_pickle_asking_for_a_class_outside_the_allow_list_is_refused_and_never_run(tiny, tmp_path, zip_format, payload):
    sentinel = tmp_path / "SENTINEL"
    ckpt = load_toy(tiny)
    if payload == "os.system":
        ckpt["cfg"] = RunsCode(sentinel)
        named = r"(os|posix)\.system"
    else:
        ckpt["model_object"] = torch.nn.Linear(2, 2)  # torch.save(model) instead of a state dict
        named = r"torch\.nn\.modules\.linear\.Linear"
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    message = assert_export_fails(tiny, tmp_path, f"{path}: refused to load: it references", checkpoint=path)
    assert re.search(named, message)
    assert not sentinel.exists()


def test_known_format_with_missing_and_wrongly_shaped_tensors_lists_them(tiny, tmp_path):
    ckpt = load_toy(tiny)
    del ckpt["model"]["decoder.layers.1.fc3.bias"]
    del ckpt["model"]["encoder.layers.0.fc2.weight"]
    ckpt["model"]["encoder.layers.1.fc1.bias"] = torch.zeros(7)
    path = tmp_path / "broken.pt"
    torch.save(ckpt, path)
    assert_export_fails(
        tiny,
        tmp_path,
        f"{path}: ",
        "missing tensors: encoder.layers.0.fc2.weight, decoder.layers.1.fc3.bias",
        "wrong shapes: encoder.layers.1.fc1.bias: checkpoint [7], config expects [128]",
        checkpoint=path,
    )


def test_unknown_format_names_the_supported_ones_and_the_keys_seen(tiny, tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": load_toy(tiny)["model"], "epoch": 3, "hyper_parameters": {}}, path)
    assert_export_fails(
        tiny,
        tmp_path,
        f"{path}: unrecognized checkpoint format (supported: fairseq-deltalm, unilm-deltalm, hf-xlmr, xlm); "
        "top-level keys: epoch, hyper_parameters, state_dict",
        checkpoint=path,
    )


def test_vocabulary_not_matching_dict_txt(tiny, tmp_path):
    smaller = tmp_path / "dict.txt"
    smaller.write_text("".join(tiny.dict.read_text().splitlines(keepends=True)[:-5]))
    assert_export_fails(
        tiny, tmp_path, f"{tiny.checkpoint}: checkpoint has 265 rows, dict.txt has 260", dict_path=smaller
    )


def test_config_declaring_absurd_layer_counts_is_refused_before_building_anything(tiny, tmp_path):
    ckpt = load_toy(tiny)
    ckpt["cfg"]["model"]["encoder_layers"] = 10**9
    path = tmp_path / "huge.pt"
    torch.save(ckpt, path)
    assert_export_fails(
        tiny,
        tmp_path,
        f"{path}: the configuration says 1000000000 encoder layers, the checkpoint holds tensors for 2",
        checkpoint=path,
    )


def test_config_values_of_the_wrong_type_are_named(tiny, tmp_path):
    ckpt = load_toy(tiny)
    ckpt["cfg"]["model"]["encoder_attention_heads"] = "four"
    ckpt["cfg"]["model"]["decoder_attention_heads"] = "four"
    path = tmp_path / "typo.pt"
    torch.save(ckpt, path)
    assert_export_fails(
        tiny, tmp_path, f"{path}: cfg.model: encoder_attention_heads = 'four' is not a number", checkpoint=path
    )


def test_damaged_bytes_anywhere_in_a_checkpoint_give_one_line(tiny, tmp_path):
    """Flipped bytes in the pickle, the storages or the zip directory: a clean error (or, where
    only tensor values were hit, a load), never a traceback."""
    import random

    from deltalm.export.checkpoints import load_checkpoint

    rng = random.Random(0)
    whole = tmp_path / "legacy.pt"
    torch.save(load_toy(tiny), whole, _use_new_zipfile_serialization=False)
    sources = [tiny.checkpoint.read_bytes(), whole.read_bytes()]
    path = tmp_path / "damaged.pt"
    for i in range(40):
        data = bytearray(sources[i % 2])
        for _ in range(1 + i % 5):
            data[rng.randrange(min(len(data), 6000) if i % 3 else len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            load_checkpoint(path, vocab_size=265)
        except DeltaLMError as e:
            assert str(path) in str(e) and "\n" not in str(e)


def test_debug_shows_the_traceback(tiny, tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(DeltaLMError, match="empty file"):
        run_cli(["--debug", *export_argv(tiny, checkpoint=path, out=tmp_path / "out")])


def test_inspect_reports_a_bad_checkpoint_the_same_way(tiny, tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    assert_one_line_error(run_cli(["inspect", path]), f"{path}: not a PyTorch checkpoint")


# --- tokenizer files ------------------------------------------------------------------------------


def test_missing_spm_model(tiny, tmp_path):
    path = tmp_path / "spm.model"
    assert_export_fails(tiny, tmp_path, f"{path}: no such sentencepiece model", spm=path)


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_corrupt_spm_model(tiny, tmp_path, damage):
    path = tmp_path / "spm.model"
    path.write_bytes(tiny.spm.read_bytes()[:1000] if damage == "truncated" else b"a sentencepiece model\n")
    assert_export_fails(tiny, tmp_path, f"{path} is not a sentencepiece model (cannot parse it)", spm=path)


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("lonely", "expected '<token> <count> [#fairseq:overwrite]', got 'lonely'"),
        ("word many", "count 'many' of token 'word' is not an integer"),
    ],
)
def test_malformed_dict_line_names_the_file_and_line(tiny, tmp_path, line, fragment):
    path = tmp_path / "dict.txt"
    lines = tiny.dict.read_text().splitlines()
    lines[6] = line
    path.write_text("\n".join(lines) + "\n")
    assert_export_fails(tiny, tmp_path, f"{path}:7: {fragment}", dict_path=path)


def test_duplicate_dict_entry_names_the_token_and_both_places(tiny, tmp_path):
    path = tmp_path / "dict.txt"
    lines = tiny.dict.read_text().splitlines()
    token = lines[2].split()[0]
    lines[9] = f"{token} 1"
    path.write_text("\n".join(lines) + "\n")
    assert_export_fails(tiny, tmp_path, f"{path}:10: duplicate token {token!r} (first at id 6)", dict_path=path)


def test_dict_that_is_not_utf8(tiny, tmp_path):
    path = tmp_path / "dict.txt"
    path.write_bytes(tiny.dict.read_bytes().replace(b"\n", b"\n\xff", 1))
    assert_export_fails(tiny, tmp_path, f"{path}:2: dictionary is not valid UTF-8", dict_path=path)


# --- artifact directories -------------------------------------------------------------------------


def translate_fails(artifact, *fragments, argv=()) -> str:
    return assert_one_line_error(run_cli(["translate", artifact, *FAST, *argv], b"hello\n"), *fragments)


def edit_manifest(artifact: Path, edit) -> Path:
    path = artifact / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("name", ["encoder.onnx", "dict.txt"])
def test_artifact_missing_a_file(artifact, name):
    (artifact / name).unlink()
    translate_fails(artifact, f"{artifact}: missing file {name} (listed in manifest.json)")


@pytest.mark.parametrize("name", ["decoder_step.onnx", "spm.model", "dict.txt"])
@pytest.mark.parametrize("command", ["translate", "parity"])
def test_artifact_file_changed_after_export(artifact, name, command):
    with open(artifact / name, "ab") as f:
        f.write(b"\n")
    res = run_cli([command, artifact, *(FAST if command == "translate" else [])], b"hello\n")
    assert_one_line_error(res, f"{artifact / name}: sha256 mismatch with manifest.json")


def test_a_file_checked_before_and_unchanged_is_not_read_again_but_any_change_is_caught(
    artifact, monkeypatch, tmp_path
):
    """deltalm.artifact.VerifiedFiles: a restart on the same artifact skips hashing what it
    already checked; a rewrite (same size), a copy or DELTALM_VERIFY=full hashes again."""
    import os
    import shutil
    import time

    import deltalm.artifact as A

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hashed = []
    real = A.sha256_file
    monkeypatch.setattr(A, "sha256_file", lambda f, *a: hashed.append(Path(f).name) or real(f, *a))
    listed = sorted(A.read_manifest(artifact).files)
    A.open_artifact(artifact)  # just written: too recent to be recorded (racy), hashed every time
    assert sorted(hashed) == listed
    old = time.time() - 10
    for name in listed:
        os.utime(artifact / name, (old, old))
    # ctime stays recent after utime: let the racy window pass once, then record
    monkeypatch.setattr(A.VerifiedFiles, "RACY_S", 0.0)
    hashed.clear()
    A.open_artifact(artifact)
    assert sorted(hashed) == listed
    hashed.clear()
    A.open_artifact(artifact)
    assert hashed == []  # every file known and unchanged
    data = bytearray((artifact / "weights.data").read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    (artifact / "weights.data").write_bytes(bytes(data))
    with pytest.raises(A.ArtifactError, match="weights.data: sha256 mismatch"):
        A.open_artifact(artifact)
    data[-1] ^= 0xFF
    (artifact / "weights.data").write_bytes(bytes(data))
    hashed.clear()
    A.open_artifact(artifact)
    assert hashed == ["weights.data"]
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    hashed.clear()
    A.open_artifact(copy)
    assert sorted(hashed) == listed
    monkeypatch.setenv("DELTALM_VERIFY", "full")
    hashed.clear()
    A.open_artifact(artifact)
    assert sorted(hashed) == listed
    monkeypatch.delenv("DELTALM_VERIFY")
    # a file that changed while it was hashed is not recorded (the bytes hashed may mix two versions)
    record = A.VerifiedFiles.open()
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"x")
    os.utime(fresh, (old, old))
    seen = A.VerifiedFiles.identity(fresh)
    record.add(fresh, "0" * 64, [*seen[:4], seen[4] - 1])
    assert str(fresh.resolve()) not in record.entries
    record.add(fresh, "0" * 64, seen)
    assert record.entries[str(fresh.resolve())] == {"sha256": "0" * 64, "identity": seen}
    (tmp_path / "cache" / "deltalm" / "verified.json").write_text("{not json")  # a broken record is ignored
    hashed.clear()
    A.open_artifact(artifact)
    assert sorted(hashed) == listed


def test_manifest_from_a_newer_format_version(artifact):
    path = edit_manifest(artifact, lambda m: m.update(format_version=3))
    translate_fails(artifact, f"{path}: manifest format version 3 is newer than this runtime supports (2)")


def test_an_artifact_of_the_previous_format_is_refused_with_the_command_that_exports_it_again(artifact):
    edit_manifest(artifact, lambda m: m.update(format_version=1))
    translate_fails(
        artifact,
        "was exported by an older deltalm (artifact format 1); this version decodes format 2",
        "export it again with `deltalm export",
    )


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: m.update(format_version="1"), "format_version must be a positive integer, got '1'"),
        (lambda m: m.pop("model"), "no valid 'model' section"),
        (lambda m: m["model"].update(heads=5), "'model' section: embed_dim 64 is not divisible by heads 5"),
        (lambda m: m["graphs"]["encoder"].update(file="../encoder.onnx"), "../encoder.onnx not listed (with a sha256)"),
        (
            lambda m: m["files"].update({"../../etc/passwd": "0" * 64}),
            "file '../../etc/passwd' is outside the artifact",
        ),
        (lambda m: m["graphs"]["decoder_step"].pop("spec"), "graph 'decoder_step' is not described completely"),
    ],
)
def test_hand_edited_manifest_is_refused_with_the_reason(artifact, edit, fragment):
    path = edit_manifest(artifact, edit)
    translate_fails(artifact, f"{path}: {fragment}")


def test_corrupt_manifest(artifact):
    path = artifact / MANIFEST
    path.write_bytes(path.read_bytes()[:200])
    translate_fails(artifact, f"{path}: corrupt manifest (JSONDecodeError")


@pytest.mark.parametrize("content", [[], ["spm.model", "dict.txt"]], ids=["empty", "tokenizer-only"])
def test_directory_without_a_manifest_is_not_an_artifact(tiny, tmp_path, content):
    directory = tmp_path / "models"
    directory.mkdir()
    for name in content:
        shutil.copy(tiny.artifact / name, directory / name)
    translate_fails(directory, f"{directory}: not an artifact directory (no manifest.json)")


def test_missing_artifact_directory(tmp_path):
    translate_fails(tmp_path / "nowhere", f"artifact directory {tmp_path / 'nowhere'} does not exist")


def test_engine_built_for_another_gpu_or_another_onnx_is_refused():
    trt = pytest.importorskip("deltalm.backends.trt")
    if not hasattr(trt, "check_engine_compat"):
        pytest.skip("no check_engine_compat in runtime/backends/trt.py yet")
    meta = {
        "graph": "decoder_step",
        "file": "engines/decoder_step.plan",
        "onnx": "decoder_step.onnx",
        "onnx_sha256": "a" * 64,
        "tensorrt": "10.9.0",
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
    }
    trt.check_engine_compat(meta, "a" * 64, "10.9.0", "NVIDIA H100 80GB HBM3", "9.0")  # its own GPU: fine
    with pytest.raises(ArtifactError) as err:
        trt.check_engine_compat(meta, "b" * 64, "10.9.0", "NVIDIA A10G", "8.6", where="art")
    message = str(err.value)
    assert "\n" not in message and message.startswith("engine engines/decoder_step.plan: ")
    assert "built from another decoder_step.onnx" in message
    assert "compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU (NVIDIA A10G) has 8.6" in message
    assert message.endswith("rebuild the engines with `deltalm engines art`")
    with pytest.raises(ArtifactError, match="built on a NVIDIA H100 80GB HBM3, this GPU is a NVIDIA H100 PCIe"):
        trt.check_engine_compat(meta, "a" * 64, "10.9.0", "NVIDIA H100 PCIe", "9.0")


def test_artifact_without_engines_cannot_run_on_trt(tiny):
    translate_fails(
        tiny.artifact,
        f"{tiny.artifact}: no TensorRT engines; build them with `deltalm engines",
        argv=["--backend", "trt"],
    )


# --- translation input ----------------------------------------------------------------------------


def translate(tiny, stdin: bytes, *argv) -> list[str]:
    res = run_cli(["translate", tiny.artifact, *FAST, *argv], stdin)
    assert res.rc == 0, res.err
    return res.lines


def test_invalid_utf8_names_the_line_and_writes_nothing(tiny, tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"Der Hund.\nThe cat.\n\xc3\x28 broken\nlast\n")
    out = tmp_path / "out.txt"
    res = run_cli(["translate", tiny.artifact, *FAST, "--input", src, "--output", out])
    assert_one_line_error(res, f"{src} line 3 is not valid UTF-8 (byte 0xc3 at byte 1); pass --errors replace")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
    res = run_cli(["translate", tiny.artifact, *FAST], src.read_bytes())  # stdin: its lines
    assert_one_line_error(res, "input line 3 is not valid UTF-8 (byte 0xc3 at byte 1); pass --errors replace")


def test_errors_replace_translates_invalid_utf8(tiny):
    assert len(translate(tiny, b"Der Hund.\n\xc3\x28 broken\n", "--errors", "replace")) == 2


def test_empty_lines_are_kept_as_empty_output_lines(tiny):
    lines = translate(tiny, b"\nThe cat sees the dog.\n\n   \nEl perro.\n\n")
    assert len(lines) == 6
    assert [i for i, line in enumerate(lines) if line == ""] == [0, 2, 3, 5]


def test_line_longer_than_the_model_positions_is_an_error(tiny, tmp_path):
    text = " ".join(toy_corpus()[:60]).encode()
    out = tmp_path / "out.txt"
    res = run_cli(["translate", tiny.artifact, *FAST, "--output", out], b"short\n" + text + b"\n")
    assert_one_line_error(
        res,
        "input line 2 has",
        "source tokens (with </s> and the source prefix); the model takes at most 512. Pass --truncate to cut it",
    )
    assert not out.exists()


def test_truncate_cuts_a_long_line_with_a_warning(tiny):
    text = " ".join(toy_corpus()[:60]).encode()
    res = run_cli(["translate", tiny.artifact, *FAST, "--truncate"], b"short\n" + text + b"\n")
    assert res.rc == 0 and len(res.lines) == 2
    assert re.fullmatch(r"deltalm: warning: input line 2: \d+ source tokens, truncated to the model's 512\n", res.err)


class LazyLines(io.RawIOBase):
    """A stream of ``count`` lines made on demand by ``line(i)``: nothing exists before it is read."""

    def __init__(self, count: int, line):
        self.lines = (line(i) for i in range(count))
        self.pending = b""
        self.handed_out = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while len(self.pending) < len(buffer):
            nxt = next(self.lines, None)
            if nxt is None:
                break
            self.pending += nxt
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        self.handed_out += n
        return n


def test_a_long_input_is_streamed_in_constant_memory(tiny):
    """10 MB then 40 MB of input (mostly blank lines of 2 kB, a sentence every 1000 lines): Python's
    peak allocation is the same for both and a small fraction of either, and every line gets its
    output line."""
    sentence = b"The cat sees the dog."

    def line(i: int) -> bytes:
        return (sentence if i % 1000 == 7 else b" " * 2000) + b"\n"

    translate(tiny, b"warm up\n")  # imports and first-use allocations are not what is measured
    peaks = []
    for count in (5_000, 20_000):
        stream = LazyLines(count, line)
        tracemalloc.start()
        try:
            res = run_cli(["translate", tiny.artifact, *FAST, "--chunk-lines", "500"], io.BufferedReader(stream))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert res.rc == 0, res.err
        assert stream.handed_out > count * 1990
        lines = res.out.decode().split("\n")
        assert len(lines) == count + 1 and lines[-1] == ""
        assert [i for i, text in enumerate(lines[:-1]) if text] == [i for i in range(count) if i % 1000 == 7]
    small, large = peaks
    assert large < 1.2 * small + 500_000 and large < 8_000_000, f"peaks {small / 1e6:.1f} MB, {large / 1e6:.1f} MB"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
        (["--max-tokens", "3"], "source tokens, more than --max-tokens 3"),
        (["--beam", "0"], "--beam must be >= 1, got 0"),
        (["--beam", "265"], "--beam 265 must be smaller than the vocabulary (265)"),
        (["--max-len-b", "-1"], "--max-len-b must be >= 0, got -1"),
        (["--max-len-a", "-0.5"], "--max-len-a must be >= 0, got -0.5"),
        (["--max-len-a", "inf"], "--max-len-a must be a finite number, got inf"),
        (["--min-len", "600", "--max-len-b", "700"], "--min-len 600 exceeds the model's maximum length 511"),
        (["--lenpen", "nan"], "--lenpen must be a finite number, got nan"),
        (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
        (["--nbest", "2"], "--nbest > 1 needs --format jsonl"),
        (["--chunk-lines", "0"], "--chunk-lines must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_options_out_of_range(tiny, tmp_path, argv, message):
    out = tmp_path / "out.txt"
    res = run_cli(["translate", tiny.artifact, *FAST, *argv, "--output", out], b"The cat sees the dog.\n")
    assert_one_line_error(res, message)
    assert not out.exists()


def test_cuda_device_without_the_cuda_provider(tiny):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    translate_fails(
        tiny.artifact, "--device cuda needs onnxruntime-gpu with the CUDA execution provider", argv=["--device", "cuda"]
    )


def test_unknown_language_tag(tiny):
    translate_fails(
        tiny.artifact,
        f"target prefix token '__xx__' is not in {tiny.artifact / 'dict.txt'}",
        argv=["--tgt-prefix", "__xx__"],
    )


# --- nothing half-written: a failing batch, --output, a killed export or translation -------------


def lines_named(message: str) -> set[int]:
    head = message.split(":")[0].rsplit(" lines ", 1)[-1]
    named = set()
    for a, b in re.findall(r"(\d+)(?:-(\d+))?", head):
        named.update(range(int(a), int(b or a) + 1))
    return named


def test_a_failing_batch_names_its_input_lines_and_writes_nothing(tiny, tok, tmp_path, monkeypatch):
    from deltalm.backends.ort import OrtBackend

    real_encode = OrtBackend.encode
    batches = []

    def encode(self, src):
        batches.append(len(src))
        if len(batches) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_encode(self, src)

    monkeypatch.setattr(OrtBackend, "encode", encode)
    corpus = toy_corpus()
    lines = [corpus[0], f"{corpus[1]} {corpus[2]}", "", corpus[6], f"{corpus[3]} {corpus[4]} {corpus[5]}", corpus[9]]
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("\n".join(lines) + "\n")
    out.write_text("previous\n")
    res = run_cli(["translate", tiny.artifact, *FAST, "--batch-size", "2", "--input", src, "--output", out])
    message = assert_one_line_error(
        res, f"translation failed for {src} lines ", "RuntimeError: CUDA error: an illegal memory access"
    )
    texts = [i for i in range(6) if lines[i]]
    by_length = sorted(texts, key=lambda i: (-len(tok.encode(lines[i])), i))  # batches: longest first
    assert lines_named(message) == {i + 1 for i in by_length[2:4]}
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


def test_output_file_appears_only_complete(tiny, tmp_path):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("\n".join(toy_corpus()[:5]) + "\n")
    assert run_cli(["translate", tiny.artifact, *FAST, "--input", src, "--output", out]).rc == 0
    assert len(out.read_text().splitlines()) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


WORK_DIR = re.compile(r"^\.model\.(partial|old)-\d+$")


def assert_previous_or_nothing(site: Path, out: Path, had_previous: bool) -> list[Path]:
    """Either ``out`` is a complete artifact (every file there, every hash right: the previous one
    or a finished new one) or there is none; whatever else is left is a hidden work directory that
    opening refuses. Returns the hidden leftovers."""
    entries = sorted(site.iterdir()) if site.exists() else []
    assert [p.name for p in entries if not p.name.startswith(".")] in ([], [out.name])
    if out.exists():
        open_artifact(out)
    elif had_previous:  # killed between the two renames of the swap: the old one is set aside
        assert previous_artifact_of(out) is not None
    hidden = [p for p in entries if p.name.startswith(".")]
    for p in hidden:
        assert WORK_DIR.match(p.name), p.name
        with pytest.raises(ArtifactError, match="left by process|set aside by an export"):
            open_artifact(p)
    return hidden


KILL_POINTS = [  # (signal, the export's stderr line to send it at, a previous artifact in place)
    ("SIGKILL", "loaded", True),  # checkpoint loaded, the work directory about to be made
    ("SIGINT", "loaded", True),
    ("SIGKILL", "exported", True),  # graphs written, parity running
    ("SIGKILL", "exported", False),
    ("SIGINT", "exported", True),
    ("SIGTERM", "exported", True),
    ("SIGKILL", "end to end, beam 5", True),  # the last line before the rename
]


@pytest.mark.parametrize(
    "sig, marker, previous",
    KILL_POINTS,
    ids=[f"{s}-{m.split(',')[0].replace(' ', '_')}-{'replace' if p else 'new'}" for s, m, p in KILL_POINTS],
)
def test_export_killed_midway_leaves_the_previous_artifact_or_nothing(tiny, tmp_path, sig, marker, previous):
    site = tmp_path / "site"
    out = site / "model"
    if previous:
        shutil.copytree(tiny.artifact, out)
    argv = [DELTALM, *export_argv(tiny, out=out), "--force"]
    proc = subprocess.Popen(
        [str(a) for a in argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            proc.send_signal(getattr(signal, sig))
            break
    err = "".join(seen) + proc.stderr.read()
    rc = proc.wait(timeout=120)
    assert any(marker in line for line in seen), err
    hidden = assert_previous_or_nothing(site, out, previous)
    if sig == "SIGKILL":
        assert rc == -signal.SIGKILL
    else:  # Ctrl-C / SIGTERM: cleaned up, one line, exit code 130
        if marker == "exported":  # inside the work directory's cleanup
            assert hidden == [] and (out.exists() or not previous)
        assert rc == 130, err
        assert err.endswith("deltalm: interrupted\n") and "Traceback" not in err


def test_stale_work_directories_are_tidied_and_a_set_aside_artifact_restored(tiny, tmp_path):
    out = tmp_path / "model"
    pid = dead_pid()
    old = Path(shutil.copytree(tiny.artifact, work_dir_name(out, "old", pid)))
    partial = Path(shutil.copytree(tiny.artifact, work_dir_name(out, "partial", pid)))
    running = work_dir_name(out, "partial")  # this process's: an export still at work, not touched
    running.mkdir()
    translate_fails(
        out,
        f"artifact directory {out} does not exist (an interrupted export left the previous "
        f"artifact in {old}: rename it back)",
    )
    translate_fails(partial, f"{partial}: not an artifact: an unfinished export, left by process {pid}, which is gone")
    done = clean_stale_work_dirs(out)
    assert done == [
        f"restored {out} from {old.name}, left by an interrupted export",
        f"removed {partial.name}, left by an interrupted export",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "model"]
    open_artifact(out)
    assert clean_stale_work_dirs(out) == []


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_translation_killed_midway_keeps_the_previous_output_file(tiny, tmp_path, sig):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    corpus = toy_corpus()
    src.write_text("\n".join(corpus[i % len(corpus)] for i in range(20_000)) + "\n")
    out.write_text("previous\n")
    argv = [DELTALM, "translate", tiny.artifact, *FAST, "--chunk-lines", "64", "--input", src, "--output", out]
    proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".out.txt.") for p in tmp_path.iterdir()):  # writing has begun
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)
    assert proc.poll() is None, "the translation finished before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert out.read_text() == "previous\n"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert [name for name in left if not name.startswith(".")] == ["in.txt", "out.txt"]
    if sig == "SIGKILL":  # at most the hidden temporary file, which the next run removes
        assert rc == -signal.SIGKILL
        assert all(re.fullmatch(r"\.out\.txt\.\d+\.[0-9a-f]+\.tmp", name) for name in left if name.startswith("."))
        src.write_text("The cat sees the dog.\n")
        assert run_cli(["translate", tiny.artifact, *FAST, "--input", src, "--output", out]).rc == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]
    else:
        assert rc == 130 and err.endswith("deltalm: interrupted\n"), err
        assert left == ["in.txt", "out.txt"]
