"""dynamo-bench: latency and quality of an exported DynaMo artifact, side by side with its baselines.

Examples:
  dynamo-bench --artifact out/reference-t3-onnx --baseline artifacts/reference-base \\
      --in-domain data/reference/corpus/heldout --threads 1 \\
      --json docs/bench-reference.json --markdown docs/bench-reference.md --plot docs/speedup_vs_quality.png
  dynamo-bench --scale --scale-sizes 70m,160m,410m --markdown docs/bench-scale.md
  dynamo-bench --artifact out/t3-onnx --threads 4 --json pi5.json      # on each device (no torch needed)
  dynamo-bench --compare laptop.json pi5.json --markdown compare.md    # side by side
Runs from the runtime-only install (pip install dynamo-export); the baselines, judging with a
checkpoint and --plot need more and are skipped, with a note, where it is missing.
See dynamo_bench for what every figure means.
"""

from __future__ import annotations

import argparse
import sys

from dynamo_bench.benchmark import MODES, BenchOptions, run_benchmark
from dynamo_bench.compare import compare_markdown, load_results
from dynamo_bench.errors import BenchError
from dynamo_bench.extras import INSTALL, NEEDS, missing_modules, unavailable
from dynamo_bench.report import bench_markdown, plot_emission_shares, plot_speedup_vs_quality, scale_markdown
from dynamo_bench.sizes import PYTHIA
from runtime.atomic import atomic_write_json, atomic_write_text
from runtime.contract import DEVICES
from runtime.errors import DynaMoRuntimeError
from runtime.help_format import HelpFormatter


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
    p = argparse.ArgumentParser(prog="dynamo-bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--artifact", help="the exported artifact directory (dynamo-export's output)")
    p.add_argument("--provider", choices=DEVICES, default="cpu", help="ONNX Runtime execution provider")
    p.add_argument(
        "--threads",
        type=int,
        help="ONNX Runtime intra-op threads and torch threads (default: library default)",
    )
    p.add_argument(
        "--prompts", help="text file, one prompt per line (replaces the paper's and in-domain prompts)"
    )
    p.add_argument("--in-domain", help="held-out corpus directory: adds in-domain prompts and PPL_d")
    p.add_argument("--num-in-domain", type=int, default=10, help="in-domain prompts to cut")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generation")
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
    p.add_argument(
        "--plot",
        help="write quality (MAUVE, self-BLEU, judged PPL) vs wall-clock speed-up here (PNG, Fig. 3)",
    )
    p.add_argument(
        "--plot-shares", help="write the share of passes emitting 1/2/3 tokens vs eps_b here (PNG, Fig. 5)"
    )
    p.add_argument(
        "--ablation",
        type=float,
        metavar="EPS_B",
        help="also run the paper's Table 9 variants (CO/AT/G3 on and off) in dynamic mode at this eps_b",
    )
    p.add_argument("--scale", action="store_true", help="random-weight Pythia sizes: export and step time")
    p.add_argument(
        "--scale-sizes", type=_words, default=tuple(PYTHIA), help=f"subset of {','.join(PYTHIA)} for --scale"
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="JSON",
        help="render results written by --json (e.g. one per device) side by side; with --markdown FILE",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _expected_errors() -> tuple[type[Exception], ...]:
    """The errors main reports in one line. The PyTorch side's (checkpoint, export) can only have been
    raised where dynamo_export.errors was imported, so it is looked up, never imported, here."""
    errors: tuple[type[Exception], ...] = (BenchError, DynaMoRuntimeError)
    torch_side = sys.modules.get("dynamo_export.errors")
    return (*errors, torch_side.DynaMoError) if torch_side is not None else errors


def _check_modes(parser: argparse.ArgumentParser, args) -> None:
    chosen = [name for name in ("artifact", "scale", "compare") if getattr(args, name)]
    if not chosen:
        parser.error("give --artifact DIR, --scale (the model-size table) or --compare A.json B.json ...")
    if len(chosen) > 1:
        parser.error(f"--{' and --'.join(chosen)} are separate jobs: give one of them")
    if (args.plot or args.plot_shares) and not args.artifact:
        parser.error(
            "--plot and --plot-shares draw the artifact benchmark; --scale and --compare have no plot"
        )
    if args.compare and args.json:
        parser.error("--compare renders existing results: drop --json (use --markdown FILE)")


def _note(text: str) -> None:
    print(f"dynamo-bench: note: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_modes(parser, args)
    result = None
    try:
        if args.compare:
            markdown = compare_markdown(load_results(args.compare))
        elif args.scale:
            missing = missing_modules(NEEDS["scale"])
            if missing:
                raise BenchError(
                    f"--scale exports models and needs {', '.join(missing)} (not installed): {INSTALL['scale']}"
                )
            from dynamo_bench.scale import run_scale  # imports torch

            result = run_scale(
                args.scale_sizes,
                args.threads if args.threads is not None else 1,
                args.provider,
                progress=not args.no_progress,
            )
            markdown = scale_markdown(result)
        else:
            plots = [
                (flag, path)
                for flag, path in (("--plot", args.plot), ("--plot-shares", args.plot_shares))
                if path
            ]
            no_plot = (
                unavailable("plot", " and ".join(f"{flag} {path}" for flag, path in plots)) if plots else None
            )
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
                ablation=args.ablation,
                progress=not args.no_progress,
                skipped=(no_plot,) if no_plot else (),
            )
            result = run_benchmark(options)
            for skipped in result["skipped"]:
                _note(skipped["note"])
            markdown = bench_markdown(result)
            if args.plot and not no_plot:
                plot_speedup_vs_quality(result, args.plot)
            if args.plot_shares and not no_plot:
                plot_emission_shares(result, args.plot_shares)
    except _expected_errors() as exc:  # evaluated when an exception arrives, after the imports ran
        print(f"dynamo-bench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(markdown)
    if args.json:
        atomic_write_json(args.json, result)
    if args.markdown:
        atomic_write_text(args.markdown, markdown)


if __name__ == "__main__":
    main()
