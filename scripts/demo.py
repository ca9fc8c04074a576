"""`make demo`: build the tiny DeltaLM (fairseq format, own sentencepiece model, fitted for a few
hundred steps on a copy task: its "translation" of a sentence is the sentence), inspect it,
export it to ONNX with parity checks, and translate with ONNX Runtime and with the PyTorch
reference. Everything runs through the `deltalm` command a user would type; it ends with the
artifact's place and three commands to try on it."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SENTENCES = [  # three from the corpus the model was fitted on, two new combinations, an empty line
    "The cat sees the red apple in the morning.",
    "Ihr Freund malt hinter der Kirche ein kleines Haus.",
    "",
    "A child wants some fresh bread at night.",
    "Notre voisin trouve une longue lettre dans le jardin.",
    "Mein Bruder malt ein kleines Haus am Sonntag.",
]


def run(*args: str, stdin: str | None = None) -> str:
    cmd = [str(Path(sys.executable).parent / "deltalm"), *args]
    print("$ deltalm " + " ".join(args), flush=True)
    res = subprocess.run(cmd, input=stdin, text=True, capture_output=True)
    sys.stderr.write(res.stderr)
    if res.returncode != 0:
        sys.exit(f"demo: `deltalm {args[0]}` failed with exit code {res.returncode}")
    return res.stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="demo")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args()
    work = Path(args.workdir)
    ckpt = work / "checkpoint_best.pt"
    if args.rebuild or not ckpt.exists():
        import torch

        from deltalm.export.toy_model import build_demo_checkpoint

        torch.set_num_threads(2)
        print(f"building the tiny DeltaLM in {work}/ (copy task, {args.steps} steps)", flush=True)
        build_demo_checkpoint(work, steps=args.steps, log=print)
    spm, dct = work / "spm.model", work / "dict.txt"
    print(run("inspect", str(ckpt), "--dict", str(dct)))
    artifact = work / "artifact"
    run("export", str(ckpt), "--spm", str(spm), "--dict", str(dct), "--out", str(artifact), "--force")
    print(run("parity", str(artifact)))
    text = "\n".join(SENTENCES) + "\n"
    ort_out = run("translate", str(artifact), "--backend", "ort", "--beam", "5", stdin=text)
    torch_out = run(
        "translate",
        "--checkpoint",
        str(ckpt),
        "--spm",
        str(spm),
        "--dict",
        str(dct),
        "--backend",
        "torch",
        "--beam",
        "5",
        stdin=text,
    )
    print(
        "The model was trained for seconds (a few hundred steps) to copy its input, so a good answer is the "
        "source itself;\na row marked * differs from it: a mistake of this barely trained model, made the same "
        "by ONNX Runtime and PyTorch.\n"
    )
    print(f"  {'source':<56} | ort (beam 5)")
    for src, hyp in zip(SENTENCES, ort_out.splitlines()):
        print(f"{'*' if hyp != src else ' '} {src:<56} | {hyp}")
    same = ort_out == torch_out
    print(f"\nONNX Runtime and PyTorch outputs identical: {same}")
    print("\nThe n-best list with scores (natural logs), as JSON lines:")
    print(
        run("translate", str(artifact), "--beam", "5", "--nbest", "2", "--format", "jsonl", stdin=SENTENCES[0] + "\n")
    )
    if not same:
        sys.exit("demo: ONNX Runtime and PyTorch disagree")
    shutil.rmtree(work / ".cache", ignore_errors=True)
    deltalm = Path(sys.executable).parent / "deltalm"
    shown = os.path.relpath(deltalm) if not os.path.relpath(deltalm).startswith("..") else str(deltalm)
    print(f"Your artifact is in {artifact}; try:")
    print(f"  echo 'The cat sees the red apple.' | {shown} translate {artifact}")
    print(f"  {shown} inspect {artifact}")
    print(
        f"  {shown} serve {artifact} --port 8000     # then: curl -s localhost:8000/v1/translate "
        """-d '{"text": ["The cat sees the red apple."]}'"""
    )


if __name__ == "__main__":
    main()
