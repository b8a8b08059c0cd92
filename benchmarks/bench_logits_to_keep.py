"""Logits only where they are needed (issue 17, item 2): pass times with and without logits_to_keep.

At the Pythia-70M shape (50k vocabulary, random weights: timing does not depend on
the values) the DynaMo-T3 graph is exported once and converted to int4 as
dynamo-export does it. After 128 tokens of past, one ONNX Runtime step is timed,
the kinds interleaved repeat by repeat so that load from other processes hits them
alike:

- ar: 1 fed token, its row (what every ar pass costs);
- dynamic: 3 fed tokens, the last row only (what a dynamic pass feeding back 3
  tokens asks for since logits_to_keep);
- 3 tokens, every row: a verify pass (head 1 checks each draft), and what a
  dynamic pass cost before logits_to_keep.

Ratios are of medians; the issue's targets: dynamic <= 1.2x ar (fp32), verify's
3-token pass <= 1.4x ar (int4).

    python -m benchmarks.bench_logits_to_keep [--repeats 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import GPTNeoXForCausalLM

from benchmarks.bench_head_cost import pythia_config, session
from converters.io_spec import dummy_inputs, io_spec
from converters.onnx_export import export_onnx
from converters.optimize import Int4Config, quantize_int4
from dynamo_export import DynaMoForCausalLM
from runtime.contract import BATCH, KEPT, PAST, SEQ

PAST_TOKENS = 128
KINDS = {"ar": (1, 1), "dynamic (last row)": (3, 1), "3 tokens, every row": (3, 3)}  # (fed, kept)
TARGETS = [("fp32", "dynamic (last row)", 1.2), ("int4", "3 tokens, every row", 1.4)]


def time_kinds(runner: ort.InferenceSession, spec, vocab: int, repeats: int) -> dict[str, np.ndarray]:
    """{kind: ms per pass over the repeats}, the kinds interleaved after three warm-up rounds."""
    rng = np.random.default_rng(0)
    feeds = {
        kind: dummy_inputs(spec, {BATCH: 1, SEQ: fed, PAST: PAST_TOKENS, KEPT: kept}, vocab, rng)
        for kind, (fed, kept) in KINDS.items()
    }
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for repeat in range(repeats + 3):
        for kind, feed in feeds.items():
            start = time.perf_counter()
            runner.run(None, feed)
            if repeat >= 3:
                times[kind].append(1e3 * (time.perf_counter() - start))
    return {kind: np.array(t) for kind, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = DynaMoForCausalLM.from_gpt_neox(
        GPTNeoXForCausalLM(pythia_config("70m")).eval(), num_token_heads=3
    )
    spec, vocab = io_spec(model.config), model.config.vocab_size
    with tempfile.TemporaryDirectory(prefix="bench_logits_to_keep-") as workdir:
        fp32 = export_onnx(model.eval(), Path(workdir) / "fp32" / "model.onnx", spec, opset=18)
        int4 = Path(workdir) / "int4" / "model.onnx"
        quantize_int4(fp32, int4, Int4Config())
        results = {
            name: time_kinds(session(path, args.threads), spec, vocab, args.repeats)
            for name, path in (("fp32", fp32), ("int4", int4))
        }
    print(
        f"\nPythia-70M shape, DynaMo-T3; ORT {ort.__version__}, {args.threads} thread(s); "
        f"{PAST_TOKENS} tokens of past; {args.repeats} interleaved repeats (ms)"
    )
    print(f"{'variant':>8} {'kind':>22} {'min':>8} {'median':>8} {'x ar':>6}")
    for name, times in results.items():
        ar = float(np.median(times["ar"]))
        for kind, t in times.items():
            print(f"{name:>8} {kind:>22} {t.min():8.2f} {np.median(t):8.2f} {np.median(t) / ar:6.2f}")
    print("\ntargets (medians)")
    for name, kind, target in TARGETS:
        ratio = float(np.median(results[name][kind]) / np.median(results[name]["ar"]))
        print(
            f"  {name} {kind} / ar  {ratio:5.2f}  (target <= {target}: {'met' if ratio <= target else 'MISSED'})"
        )


if __name__ == "__main__":
    main()
