"""`make run`: export the shipped reference DynaMo-T3 and generate from it.

1. dynamo-export artifacts/reference-t3 (with its co-occurrence masks) to
   out/reference-t3-onnx, verifying ONNX Runtime against PyTorch.
2. Generate from a few prompts with the torch-free runtime in `ar`, `dynamic`
   and `verify` modes, printing tokens per pass and speed side by side.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from converters.cli import main as export_main
from runtime import DynaMoRuntime, SamplingConfig

MODEL = Path("artifacts/reference-t3")
OUT = Path("out/reference-t3-onnx")
PROMPTS = [
    "The os module provides",
    "To open a file for reading, use",
    "This is going to be a very",
    "Please explain",
]
MODES = [
    ("ar", SamplingConfig(mode="ar")),
    ("dynamic eps_b=0.5", SamplingConfig(mode="dynamic", eps_b=0.5)),
    ("dynamic eps_b=0.25", SamplingConfig(mode="dynamic", eps_b=0.25)),
    ("verify", SamplingConfig(mode="verify")),
]
NEW_TOKENS = 64


def main() -> int:
    if not (MODEL / "config.json").is_file():
        print(f"{MODEL} is missing: run `make reference-model` to build it", file=sys.stderr)
        return 2
    args = ["--model", str(MODEL), "--out", str(OUT), "--force"]
    if (MODEL / "cooccurrence").is_dir():
        args += ["--cooccurrence", str(MODEL / "cooccurrence")]
    code = export_main(args)
    if code:
        return code
    rt = DynaMoRuntime.load(OUT, provider="cpu")
    print(
        f"\nONNX Runtime on its default threads ({os.cpu_count()} CPUs here), each mode after one untimed call;"
    )
    print(
        "docs/bench-reference.md is the full benchmark (make bench: 1 thread, 20 prompts x 3 seeds, 3 rounds)."
    )
    print(f"\n{'mode':<20} {'tokens/pass':>11} {'tokens/s':>9} {'decode tok/s':>12} {'sampling/ORT':>12}")
    for name, config in MODES:
        # warm-up: ORT's arenas, the sampler's first steps and Python's specialised bytecode
        rt.generate(PROMPTS[0], 16, config, seed=0)
        passes = tokens = seconds = decode_tokens = decode_s = ort = sampling = 0.0
        samples = []
        for i, prompt in enumerate(PROMPTS):
            result = rt.generate(prompt, NEW_TOKENS, config, seed=i)
            s = result.stats
            passes += s.forward_passes
            tokens += s.new_tokens
            seconds += s.prefill_s + s.decode_s
            decode_tokens += s.new_tokens - s.first_pass_tokens
            decode_s += s.decode_s
            ort += s.decode_ort_s
            sampling += s.decode_sampling_s
            samples.append(result.text)
        print(
            f"{name:<20} {tokens / passes:>11.2f} {tokens / seconds:>9.1f} {decode_tokens / decode_s:>12.1f} "
            f"{sampling / ort:>12.2f}"
        )
        print(f"    {PROMPTS[0]!r} -> {samples[0][:110]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
