"""A fingerprint of what the runtime generates: fixed prompts x seeds x modes on one artifact.

A refactor of the sampler must not change a single token; this prints one sha256
per mode and one over all of them, so two commits can be compared on the same
artifact (tokens depend on the weights too: pin the artifact, not the checkout's
reference model, when comparing across a retraining).

    python -m benchmarks.output_hash --artifact out/reference-t3-onnx [--json hashes.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json

from runtime import DynaMoRuntime, SamplingConfig

PROMPTS = [
    "I am a student at the",
    "This is going to be a very",
    "He wanted to play, but",
    "How can we",
    "Please explain",
    "The os module provides",
    "def read_file(path):",
    "import os\n",
]
SEEDS = (0, 1, 2)
MODES = {
    "ar": SamplingConfig(mode="ar"),
    "ar-greedy": SamplingConfig(mode="ar", temperature=0.0),
    "dynamic-0.5": SamplingConfig(mode="dynamic", eps_b=0.5),
    "dynamic-0.25": SamplingConfig(mode="dynamic", eps_b=0.25),
    "dynamic-greedy": SamplingConfig(mode="dynamic", temperature=0.0),
    "dynamic-plain": SamplingConfig(mode="dynamic", alpha_c=0.0, adaptive=False, blur=0),
    "verify": SamplingConfig(mode="verify"),
    "verify-greedy": SamplingConfig(mode="verify", temperature=0.0),
    "verify-marginal": SamplingConfig(mode="verify", alpha_c=0.0),
}


def mode_hashes(rt: DynaMoRuntime, max_new_tokens: int) -> dict[str, str]:
    """sha256 of the generated ids of every prompt x seed, per mode."""
    hashes = {}
    for name, config in MODES.items():
        digest = hashlib.sha256()
        for prompt in PROMPTS:
            for seed in SEEDS:
                ids = rt.generate(prompt, max_new_tokens, config, seed=seed).token_ids
                digest.update(json.dumps([prompt, seed, ids]).encode())
        hashes[name] = digest.hexdigest()
    return hashes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--artifact", default="out/reference-t3-onnx", help="exported artifact (default: %(default)s)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="tokens per generation (default: %(default)s)"
    )
    parser.add_argument("--json", help="also write the hashes to this file")
    args = parser.parse_args(argv)
    rt = DynaMoRuntime.load(args.artifact, threads=1)
    hashes = mode_hashes(rt, args.max_new_tokens)
    hashes["all"] = hashlib.sha256("".join(hashes.values()).encode()).hexdigest()
    for name, value in hashes.items():
        print(f"{name:<16} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(hashes, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
