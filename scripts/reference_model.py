"""Build the shipped reference models, resuming whatever is already done.

    python -m scripts.reference_model          (make reference-model)

Steps, each skipped when its output exists (training resumes from its last
checkpoint after an interruption):
1. data/reference/: Python 3.11 docs -> 8k byte-level BPE -> token files.
2. work/reference/base: a Pythia-architecture GPT-NeoX trained from scratch.
3. work/reference/t3: DynaMo-T3 from the base, modified-CLM with LR_B : LR_M :
   LR_MB = 1e-5 : 1e-3 : 1e-6 (the paper's Pythia-70M values).
4. work/reference/cooccurrence: pair and triple masks of the training split.
5. work/reference/eval-*.json: dynamo-eval of both models on the held-out split,
   in fp32 and after the fp16 round trip the shipped files go through.
6. artifacts/reference-base, artifacts/reference-t3: fp16 safetensors + tokenizer
   (+ masks), and artifacts/reference-build.json with the timings.
Everything is seeded; the commands run are the ones recorded in the model card.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA = Path("data/reference")
WORK = Path("work/reference")
ARTIFACTS = Path("artifacts")
SEED = 0

BASE_ARGS = [
    "--layers", "6", "--hidden", "256", "--heads", "8", "--context", "1024",
    "--seq-len", "256", "--batch-size", "8", "--steps", "1200", "--lr-b", "1e-3",
    "--eval-every", "200", "--eval-batches", "8", "--save-every", "100",
]
T3_ARGS = [
    "--num-token-heads", "3", "--head-init", "copy",
    "--seq-len", "256", "--batch-size", "8", "--steps", "300",
    "--lr-b", "1e-5", "--lr-m", "1e-3", "--lr-mb", "1e-6",
    "--eval-every", "50", "--eval-batches", "8", "--save-every", "50",
]


def run(args: list[str]) -> float:
    print("+", " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], check=True)
    return time.perf_counter() - start


def train(out: Path, extra: list[str]) -> float | None:
    if (out / "final").is_dir():
        print(f"{out}/final exists; skipping", flush=True)
        return None
    resume = ["--resume"] if list((out / "checkpoints").glob("step-*")) else []
    return run([
        "dynamo_export.cli.train", "--train", str(DATA / "train.bin"), "--val", str(DATA / "heldout.bin"),
        "--out", str(out), "--seed", str(SEED), "--tokenizer", str(DATA / "tokenizer.json"), *extra, *resume,
    ])


def evaluate(model: Path, name: str) -> None:
    out = WORK / f"eval-{name}.json"
    if out.is_file():
        return
    run(["dynamo_export.cli.eval", "--model", str(model), "--tokens", str(DATA / "heldout.bin"),
         "--seq-len", "256", "--batch-size", "8", "--json", str(out)])


def fp16_copy(source: Path, target: Path) -> None:
    """Re-save a checkpoint with fp16 weights (what ships in git)."""
    if target.is_dir():
        return
    from dynamo_export.checkpoint import checkpoint_kind

    if checkpoint_kind(source) == "dynamo":
        import torch

        from dynamo_export import DynaMoForCausalLM

        DynaMoForCausalLM.from_pretrained(source).save_pretrained(target, dtype=torch.float16)
    else:
        import torch
        from transformers import GPTNeoXForCausalLM

        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        GPTNeoXForCausalLM.from_pretrained(source).to(torch.float16).save_pretrained(tmp)
        for name in ("tokenizer.json",):
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        os.replace(tmp, target)


def main() -> None:
    timings_path = WORK / "timings.json"
    WORK.mkdir(parents=True, exist_ok=True)
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def record(name: str, seconds: float | None) -> None:
        if seconds is not None:
            timings[name] = timings.get(name, 0.0) + seconds
            timings_path.write_text(json.dumps(timings, indent=2))

    record("data_s", run(["scripts.reference_data", "--out", str(DATA)]))
    record("base_train_s", train(WORK / "base", BASE_ARGS))
    base = WORK / "base" / "final-gpt-neox"
    record("t3_train_s", train(WORK / "t3", ["--model", str(base), *T3_ARGS]))
    if not (WORK / "cooccurrence").is_dir():
        record("cooccurrence_s", run(["dynamo_export.cli.cooccur", "--tokens", str(DATA / "train.bin"),
                                      "--out", str(WORK / "cooccurrence"), "--orders", "2,3", "--workers", "2"]))
    fp16_copy(base, WORK / "base-fp16")
    fp16_copy(WORK / "t3" / "final", WORK / "t3-fp16")
    for model, name in ((base, "base"), (WORK / "t3" / "final", "t3"),
                        (WORK / "base-fp16", "base-fp16"), (WORK / "t3-fp16", "t3-fp16")):
        evaluate(model, name)
    install()
    print(json.dumps(timings, indent=2))


def install() -> None:
    """Copy the fp16 checkpoints (+ masks) into artifacts/, replacing older ones."""
    for source, name in ((WORK / "base-fp16", "reference-base"), (WORK / "t3-fp16", "reference-t3")):
        target = ARTIFACTS / name
        tmp = ARTIFACTS / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        if name == "reference-t3":
            shutil.copytree(WORK / "cooccurrence", tmp / "cooccurrence")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    build = {"timings_s": json.loads((WORK / "timings.json").read_text()),
             "eval": {p.stem: json.loads(p.read_text()) for p in sorted(WORK.glob("eval-*.json"))},
             "base_args": BASE_ARGS, "t3_args": T3_ARGS, "seed": SEED}
    (ARTIFACTS / "reference-build.json").write_text(json.dumps(build, indent=2) + "\n")


if __name__ == "__main__":
    main()
