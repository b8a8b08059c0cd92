"""dynamo-bench: latency and quality of an exported DynaMo artifact, side by side with its baselines.

Examples:
  dynamo-bench --artifact out/reference-t3-onnx --baseline artifacts/reference-base \\
      --in-domain data/reference/corpus/heldout --threads 1 \\
      --json docs/bench-reference.json --markdown docs/bench-reference.md --plot docs/speedup_vs_quality.png
  dynamo-bench --scale --scale-sizes 70m,160m,410m --markdown docs/bench-scale.md
See dynamo_bench for what every figure means.
"""

from __future__ import annotations

import argparse
import sys

from dynamo_bench.benchmark import MODES, BenchOptions, run_benchmark
from dynamo_bench.report import (
    bench_markdown,
    plot_speedup_vs_quality,
    scale_markdown,
)
from dynamo_bench.scale import PYTHIA, run_scale
from dynamo_export.errors import DynaMoError
from runtime.atomic import atomic_write_json, atomic_write_text
from runtime.contract import DEVICES
from runtime.errors import DynaMoRuntimeError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _words(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamo-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--artifact", help="the exported artifact directory (dynamo-export's output)")
    p.add_argument("--provider", choices=DEVICES, default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        help="ONNX Runtime intra-op threads and torch threads (default: library default)",
    )
    p.add_argument(
        "--prompts", help="text file, one prompt per line (replaces the paper's and in-domain prompts)"
    )
    p.add_argument("--in-domain", help="held-out corpus directory: adds in-domain prompts and PPL_d")
    p.add_argument("--num-in-domain", type=int, default=10, help="in-domain prompts to cut (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--eps-b", type=_floats, default=(0.25, 0.5, 0.75), help="comma-separated, e.g. 0.25,0.5,0.75"
    )
    p.add_argument(
        "--modes",
        type=_words,
        default=MODES,
        help=f"comma-separated subset of {','.join(MODES)} (ar always runs)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed rounds over all prompts and seeds")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per runner before the rounds")
    p.add_argument("--seeds", type=_ints, default=(0, 1, 2), help="comma-separated sampling seeds")
    p.add_argument(
        "--baseline", help="the base model's checkpoint: adds Optimum and PyTorch, and judges with it"
    )
    p.add_argument("--judge", help="artifact or checkpoint that scores generations (default: --baseline)")
    p.add_argument("--json", help="write the full result here (atomically)")
    p.add_argument("--markdown", help="write the markdown tables here (atomically)")
    p.add_argument("--plot", help="write the speed-up vs judged perplexity plot here (PNG)")
    p.add_argument("--scale", action="store_true", help="random-weight Pythia sizes: export and step time")
    p.add_argument("--scale-sizes", type=_words, default=tuple(PYTHIA), help=f"subset of {','.join(PYTHIA)}")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.scale and not args.artifact:
        parser.error("give --artifact DIR (or --scale for the model-size table)")
    if args.scale and args.plot:
        parser.error("--plot draws the artifact benchmark; --scale has no plot")
    try:
        if args.scale:
            result = run_scale(
                args.scale_sizes,
                args.threads if args.threads is not None else 1,
                args.provider,
                progress=not args.no_progress,
            )
            markdown = scale_markdown(result)
        else:
            options = BenchOptions(
                artifact=args.artifact,
                provider=args.provider,
                threads=args.threads,
                prompts_file=args.prompts,
                in_domain=args.in_domain,
                num_in_domain=args.num_in_domain,
                max_new_tokens=args.max_new_tokens,
                eps_b=args.eps_b,
                modes=args.modes,
                repeats=args.repeats,
                warmup=args.warmup,
                seeds=args.seeds,
                baseline=args.baseline,
                judge=args.judge,
                progress=not args.no_progress,
            )
            result = run_benchmark(options)
            markdown = bench_markdown(result)
            if args.plot:
                plot_speedup_vs_quality(result, args.plot)
    except (DynaMoError, DynaMoRuntimeError) as exc:
        print(f"dynamo-bench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(markdown)
    if args.json:
        atomic_write_json(args.json, result)
    if args.markdown:
        atomic_write_text(args.markdown, markdown)


if __name__ == "__main__":
    main()
