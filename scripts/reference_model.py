"""Build the shipped reference models, resuming whatever is already done.

    python -m scripts.reference_model            (make reference-model)
    python -m scripts.reference_model --search   the stage-2 recipe search (not part of the build)

Steps, each skipped when its output exists (training resumes from its last
checkpoint after an interruption):
1. data/reference/: Python 3.11 docs -> 8k byte-level BPE -> token files.
2. work/reference/base: a Pythia-architecture GPT-NeoX trained from scratch.
3. work/reference/cooccurrence: pair and triple masks of the training split.
   --search stops here after training every SEARCH recipe from the base into
   work/reference/search/NAME and measuring it (step 6's evaluation), and
   writes work/reference/search.json, which the build then reports.
4. work/reference/t3: DynaMo-T3 from the base, modified-CLM with LR_B : LR_M :
   LR_MB = 1e-5 : 1e-3 : 1e-6 (the paper's Pythia-70M values) and the recipe
   RECIPE chosen by the search (self-distillation of heads 2..n).
5. fp16 copies of both models (what ships).
6. work/reference/eval-*.json: dynamo-eval of both models on the held-out split,
   in fp32 and after the fp16 round trip: PPL_1..n, and for T3 the expected
   verify acceptance per draft position, marginal and conditioned on the masks.
7. artifacts/reference-base, artifacts/reference-t3: fp16 safetensors + tokenizer
   (+ masks), and artifacts/reference-build.json with the timings and results.
Everything is seeded and runs on one thread (OMP_NUM_THREADS, unless set); the
commands run are the ones recorded in the model card.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from runtime.atomic import atomic_directory, atomic_write_json

DATA = Path("data/reference")
WORK = Path("work/reference")
ARTIFACTS = Path("artifacts")
SEED = 0

BASE_ARGS = [
    "--layers",
    "6",
    "--hidden",
    "256",
    "--heads",
    "8",
    "--context",
    "1024",
    "--seq-len",
    "256",
    "--batch-size",
    "8",
    "--steps",
    "1200",
    "--lr-b",
    "1e-3",
    "--eval-every",
    "200",
    "--eval-batches",
    "8",
    "--save-every",
    "100",
]
T3_COMMON = [
    "--num-token-heads",
    "3",
    "--head-init",
    "copy",
    "--seq-len",
    "256",
    "--batch-size",
    "8",
    "--steps",
    "300",
    "--lr-b",
    "1e-5",
    "--lr-m",
    "1e-3",
    "--lr-mb",
    "1e-6",
    "--eval-every",
    "50",
    "--eval-batches",
    "8",
    "--save-every",
    "50",
]
# Stage-2 recipes the search compares (added to T3_COMMON); RECIPE is the one the build trains.
SEARCH = {
    "plain": [],
    "distill-1.0": ["--distill", "1.0"],
    "distill-0.5": ["--distill", "0.5"],
    "distill-0.5-t0.7": ["--distill", "0.5", "--distill-temperature", "0.7"],
    "distill-1.0-t0.7": ["--distill", "1.0", "--distill-temperature", "0.7"],
}
RECIPE = "distill-0.5-t0.7"
T3_ARGS = [*T3_COMMON, *SEARCH[RECIPE]]
EVAL_ARGS = ["--seq-len", "256", "--batch-size", "8"]


def run(args: list[str]) -> float:
    print("+", " ".join(args), flush=True)
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-m", *args], check=True, env=env)
    return time.perf_counter() - start


def train(out: Path, extra: list[str]) -> float | None:
    if (out / "final").is_dir():
        print(f"{out}/final exists; skipping", flush=True)
        return None
    resume = ["--resume"] if list((out / "checkpoints").glob("step-*")) else []
    return run(
        [
            "dynamo_export.cli.train",
            "--train",
            str(DATA / "train.bin"),
            "--val",
            str(DATA / "heldout.bin"),
            "--out",
            str(out),
            "--seed",
            str(SEED),
            "--tokenizer",
            str(DATA / "tokenizer.json"),
            *extra,
            *resume,
        ]
    )


def evaluate(model: Path, out: Path, acceptance: bool) -> dict:
    """dynamo-eval on the held-out split (+ the expected acceptance with and without masks) -> out."""
    if not out.is_file():
        extra = ["--acceptance", "--cooccurrence", str(WORK / "cooccurrence")] if acceptance else []
        run(
            [
                "dynamo_export.cli.eval",
                "--model",
                str(model),
                "--tokens",
                str(DATA / "heldout.bin"),
                *EVAL_ARGS,
                *extra,
                "--json",
                str(out),
                "--no-progress",
            ]
        )
    return json.loads(out.read_text())


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

        with atomic_directory(target) as tmp:
            GPTNeoXForCausalLM.from_pretrained(source).to(torch.float16).save_pretrained(tmp)
            if (source / "tokenizer.json").is_file():
                shutil.copy2(source / "tokenizer.json", tmp / "tokenizer.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stop-after", choices=["data", "base"], help="stop after this step (resume later)")
    parser.add_argument(
        "--search", action="store_true", help="run the stage-2 recipe search instead of the build"
    )
    args = parser.parse_args(argv)
    timings_path = WORK / "timings.json"
    WORK.mkdir(parents=True, exist_ok=True)
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def record(name: str, seconds: float | None) -> None:
        if seconds is not None:
            timings[name] = timings.get(name, 0.0) + seconds
            atomic_write_json(timings_path, timings)

    record("data_s", run(["scripts.reference_data", "--out", str(DATA)]))
    if args.stop_after == "data":
        return
    record("base_train_s", train(WORK / "base", BASE_ARGS))
    if args.stop_after == "base":
        return
    base = WORK / "base" / "final-gpt-neox"
    if not (WORK / "cooccurrence").is_dir():
        record(
            "cooccurrence_s",
            run(
                [
                    "dynamo_export.cli.cooccur",
                    "--tokens",
                    str(DATA / "train.bin"),
                    "--out",
                    str(WORK / "cooccurrence"),
                    "--orders",
                    "2,3",
                    "--workers",
                    "2",
                ]
            ),
        )
    if args.search:
        search(base)
        return
    reused_s = reuse_search_run(WORK / "t3")
    record(
        "t3_train_s",
        reused_s if reused_s is not None else train(WORK / "t3", ["--model", str(base), *T3_ARGS]),
    )
    fp16_copy(base, WORK / "base-fp16")
    fp16_copy(WORK / "t3" / "final", WORK / "t3-fp16")
    for model, name in (
        (base, "base"),
        (WORK / "t3" / "final", "t3"),
        (WORK / "base-fp16", "base-fp16"),
        (WORK / "t3-fp16", "t3-fp16"),
    ):
        evaluate(model, WORK / f"eval-{name}.json", acceptance=name.startswith("t3"))
    install()
    print(json.dumps(timings, indent=2))


def reuse_search_run(t3: Path) -> float | None:
    """Take the search's run of RECIPE as the T3 stage (the same seeded command, so the same model).

    Returns the search run's training seconds, or None when there is nothing to reuse.
    """
    searched = WORK / "search" / RECIPE
    if t3.exists() or not (searched / "final").is_dir():
        return None
    print(f"{t3}: reusing {searched} (same command and seed)", flush=True)
    with atomic_directory(t3) as tmp:
        shutil.copytree(searched, tmp, dirs_exist_ok=True)
    return json.loads((WORK / "search.json").read_text())[RECIPE]["train_s"]


def search(base: Path) -> None:
    """Train every SEARCH recipe from the base and measure it on the held-out split -> search.json."""
    results_path = WORK / "search.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name, extra in SEARCH.items():
        out = WORK / "search" / name
        seconds = train(out, ["--model", str(base), *T3_COMMON, *extra])
        report = evaluate(out / "final", out / "eval.json", acceptance=True)
        entry = results.get(name, {})
        if seconds is not None:
            entry["train_s"] = entry.get("train_s", 0.0) + seconds
        entry.update(
            args=extra,
            ppl=report["ppl"],
            alpha=report["acceptance"]["alpha"],
            mask_use=report["acceptance"]["mask_use"],
        )
        results[name] = entry
        atomic_write_json(results_path, results)
    print(json.dumps(results, indent=2))


def install() -> None:
    """Copy the fp16 checkpoints (+ masks) into artifacts/, each directory replaced whole."""
    for source, name in ((WORK / "base-fp16", "reference-base"), (WORK / "t3-fp16", "reference-t3")):
        with atomic_directory(ARTIFACTS / name, overwrite=True) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            if name == "reference-t3":
                shutil.copytree(WORK / "cooccurrence", tmp / "cooccurrence")
    search_path = WORK / "search.json"
    build = {
        "timings_s": json.loads((WORK / "timings.json").read_text()),
        "eval": {p.stem: json.loads(p.read_text()) for p in sorted(WORK.glob("eval-*.json"))},
        "base_args": BASE_ARGS,
        "t3_args": T3_ARGS,
        "recipe": RECIPE,
        "seed": SEED,
        "recipe_search": json.loads(search_path.read_text()) if search_path.is_file() else None,
    }
    atomic_write_json(ARTIFACTS / "reference-build.json", build)


if __name__ == "__main__":
    main()
