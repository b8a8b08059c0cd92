"""verify at the Pythia-70M shape: what a pass costs, so what a measured tokens-per-pass buys there.

The reference model (8k vocabulary, width 256) is small enough that sampling and the
per-token cost of a pass weigh heavily. At Pythia-70M's shape (50,304 tokens, width 512,
6 layers, random weights: timing does not depend on the values) this script times, on one
ONNX Runtime thread:
- one pass of the DynaMo-T3 graph feeding 1 token (ar, and dynamic's common case) and 3
  tokens (verify's: head 1's token and two drafts) after a 128-token cache (interleaved
  repeats, min and median);
- the sampling of one pass at that vocabulary: `ar` (head 1's top-k and draw) and `verify`
  (the drafts of heads 2-3 conditioned on co-occurrence masks, then head 1's check of both
  drafts at three positions), on logits drawn like a trained model's (a few likely tokens),
  with masks counted on a synthetic Zipf token stream of the same vocabulary;
and prints the wall-clock speed-up over `ar` that a tokens-per-pass figure (measured on the
reference model by dynamo-bench) implies at this shape.

    python -m benchmarks.bench_verify_scale [--tokens-per-pass 1.81] [--repeats 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPTNeoXForCausalLM

from benchmarks.bench_head_cost import PAST_TOKENS, export_variant, pythia_config, session
from converters.io_spec import dummy_inputs
from dynamo_export.cooccurrence import build_cooccurrence
from dynamo_export.tokens import write_token_file
from runtime import CooccurrenceMask, SamplingConfig
from runtime.contract import BATCH, PAST, SEQ
from runtime.draws import sample_ar
from runtime.tokensets import SeenTokens, tokens_plus
from runtime.verify import Verifier

STREAM_TOKENS = 2_000_000


def pass_ms(path: Path, spec, vocab: int, repeats: int) -> dict[int, np.ndarray]:
    """{fed tokens: ms per pass}, 1 and 3 tokens interleaved repeat by repeat after a 128-token cache."""
    rng = np.random.default_rng(0)
    runner = session(path, 1)
    feeds = {new: dummy_inputs(spec, {BATCH: 1, SEQ: new, PAST: PAST_TOKENS}, vocab, rng) for new in (1, 3)}
    times: dict[int, list[float]] = {1: [], 3: []}
    for repeat in range(repeats + 3):  # 3 warm-up rounds: allocations, pre-packed weights
        for new, feed in feeds.items():
            start = time.perf_counter()
            runner.run(None, feed)
            if repeat >= 3:
                times[new].append(1e3 * (time.perf_counter() - start))
    return {new: np.array(t) for new, t in times.items()}


def synthetic_masks(vocab: int, folder: Path) -> CooccurrenceMask:
    """Pair and triple masks of a Zipf(1.1) token stream: a long tail, like text's."""
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.1, STREAM_TOKENS) - 1, vocab - 1).astype(np.int64)
    write_token_file(folder / "stream", ids, vocab_size=vocab, eot_id=0)
    build_cooccurrence(folder / "stream", folder / "masks", orders=(2, 3), workers=1, progress=False)
    return CooccurrenceMask.load(folder / "masks", expected_vocab_size=vocab)


def trained_like_logits(rng: np.random.Generator, rows: int, vocab: int) -> np.ndarray:
    """Logits whose softmax at T = 0.7 puts most mass on a few tokens, as a trained head's does."""
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    for row in logits:
        row[rng.integers(0, 200, 8)] += rng.uniform(4, 9, 8).astype(np.float32)
    return logits


def sampling_ms(masks: CooccurrenceMask, vocab: int, repeats: int) -> dict[str, float]:
    """Median ms of one pass's sampling: ar, and verify's drafts + check."""
    rng = np.random.default_rng(1)
    config = SamplingConfig(mode="verify")
    seen = SeenTokens(vocab)
    seen.add([int(t) for t in rng.integers(0, 200, 40)])
    verifier = Verifier()
    times: dict[str, list[float]] = {"ar": [], "verify": []}
    for _ in range(repeats):
        heads, head1 = trained_like_logits(rng, 3, vocab), trained_like_logits(rng, 3, vocab)
        start = time.perf_counter()
        after = sample_ar(heads[0], seen, config, rng)
        times["ar"].append(time.perf_counter() - start)
        start = time.perf_counter()
        draft = verifier.draft(heads[1:], after, tokens_plus(seen, [after]), masks, config, rng)
        verifier.check(head1, draft, tokens_plus(seen, [after]), masks, config, rng)
        times["verify"].append(time.perf_counter() - start)
    return {mode: 1e3 * float(np.median(t)) for mode, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens-per-pass",
        type=float,
        default=1.81,
        help="verify's, from dynamo-bench (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = pythia_config("70m")
    with tempfile.TemporaryDirectory(prefix="bench_verify_scale-") as workdir:
        folder = Path(workdir)
        base = GPTNeoXForCausalLM(config).eval()
        exported, _fused, spec, _figures = export_variant(base, 3, folder / "t3")
        del base
        passes = pass_ms(exported, spec, config.vocab_size, args.repeats)
        masks = synthetic_masks(config.vocab_size, folder)
        sampling = sampling_ms(masks, config.vocab_size, args.repeats)
    ar_pass, verify_pass = float(np.median(passes[1])), float(np.median(passes[3]))
    print(f"Pythia-70M shape, T3 graph, vocabulary {config.vocab_size}, 1 ONNX Runtime thread (medians):")
    print(f"  pass: 1 token {ar_pass:.2f} ms (min {np.min(passes[1]):.2f}), "
          f"3 tokens {verify_pass:.2f} ms (min {np.min(passes[3]):.2f}): {verify_pass / ar_pass:.2f}x")  # fmt: skip
    print(f"  sampling per pass: ar {sampling['ar']:.3f} ms, verify {sampling['verify']:.3f} ms")
    ar_step, verify_step = ar_pass + sampling["ar"], verify_pass + sampling["verify"]
    print(
        f"  a verify pass costs {verify_step / ar_step:.3f}x an ar pass: at {args.tokens_per_pass:.2f} tokens "
        f"per pass, verify runs {args.tokens_per_pass * ar_step / verify_step:.2f}x ar's tokens/s"
    )


if __name__ == "__main__":
    main()
