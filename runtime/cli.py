"""dynamo-generate: generate from an exported artifact with the torch-free runtime.

    dynamo-generate --artifact out/reference-t3-onnx --prompt "The os module" --mode dynamic --eps-b 0.6

A thin layer over DynaMoRuntime.generate / stream; sampling options default to
the artifact's manifest and are validated by SamplingConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from runtime.config import MODES, SamplingConfig
from runtime.contract import PROVIDERS
from runtime.engine import DynaMoRuntime
from runtime.errors import DynaMoRuntimeError
from runtime.help_format import HelpFormatter

OPTION_FLAGS = (
    "mode",
    "eps_b",
    "top_k",
    "temperature",
    "repetition_penalty",
    "alpha_c",
    "blur",
    "static_threshold",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-generate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--artifact", required=True, help="directory written by dynamo-export")
    p.add_argument("--prompt", required=True, help="text prompt (needs the artifact's tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--seed", type=int, help="random seed (default: fresh entropy; same seed, same tokens)")
    p.add_argument("--provider", default="cpu", choices=PROVIDERS, help="ONNX Runtime execution provider")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's choice)")
    p.add_argument(
        "--require-signature",
        metavar="PUBKEY",
        help="refuse the artifact unless its model.sig is this elliptic-curve public key's (PEM) signature "
        'over every file (dynamo-export --sign; needs pip install "dynamo-export[sign]") (default: not checked)',
    )
    defaults = SamplingConfig()  # the manifest's sampling_defaults override these per artifact
    for flag, kind, meaning in (
        (
            "--mode",
            str,
            "ar: head 1 alone; dynamic: DynaMo's Algorithm 1; verify: lossless drafts from the joint",
        ),
        (
            "--eps-b",
            float,
            "back-off strength in [0, 1]: 0 always emits n tokens, 1 is ar; 0.6 is the fastest that kept ar's "
            "quality in the reference model's sweep (README)",
        ),
        ("--top-k", int, "candidates per head"),
        ("--temperature", float, "softmax temperature (0 = greedy)"),
        ("--repetition-penalty", float, "divides the probabilities of generated tokens"),
        ("--alpha-c", float, "exponent of the co-occurrence weights (0: no masking)"),
        ("--blur", int, "Gaussian kernel before Otsu's threshold (0 = off)"),
        ("--static-threshold", float, "joint entries below it become 0"),
    ):
        name = flag[2:].replace("-", "_")
        extra = {"choices": MODES} if name == "mode" else {}
        p.add_argument(
            flag,
            type=kind,
            help=f"{meaning} (default: the artifact's, else {getattr(defaults, name)})",
            **extra,
        )
    p.add_argument("--no-adaptive", action="store_true", help="turn Otsu's threshold off (implies --blur 0)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as passes accept tokens")
    p.add_argument("--json", action="store_true", help="print the result and stats as JSON")
    return p


def sampling_config(args, defaults: SamplingConfig) -> SamplingConfig:
    changes = {name: getattr(args, name) for name in OPTION_FLAGS if getattr(args, name) is not None}
    if args.no_adaptive:
        changes.update(adaptive=False, blur=0)
    if args.stop:
        changes["stop"] = (*defaults.stop, *args.stop)
    return defaults.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rt = DynaMoRuntime.load(
            args.artifact,
            provider=args.provider,
            threads=args.threads,
            verify_signature=args.require_signature,
        )
        config = sampling_config(args, rt.default_config)
        if args.stream and not args.json:
            pieces = rt.stream(args.prompt, args.max_new_tokens, config, seed=args.seed)
            while True:
                try:
                    print(next(pieces), end="", flush=True)
                except StopIteration as done:  # the stream returns its stats
                    stats = done.value
                    break
            print(flush=True)
            for line in summary(stats, config, rt.manifest.model.context_length):
                print(line, file=sys.stderr)
            return 0
        result = rt.generate(args.prompt, args.max_new_tokens, config, seed=args.seed)
    except DynaMoRuntimeError as exc:
        print(f"dynamo-generate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "text": result.text,
                    "token_ids": result.token_ids,
                    "config": dataclasses.asdict(config),
                    "stats": result.stats.to_dict(),
                },
                indent=2,
            )
        )
    else:
        print(result.text, flush=True)  # before the stats on stderr
        for line in summary(result.stats, config, rt.manifest.model.context_length):
            print(line, file=sys.stderr)
    return 0


def summary(stats, config: SamplingConfig, context: int) -> list[str]:
    """The stats lines printed under the text: passes and speed; for verify, its acceptance; and why
    a generation stopped short when the context ran out."""
    lines = [
        f"-- {stats.new_tokens} tokens in {stats.forward_passes} passes "
        f"({stats.tokens_per_pass:.2f} tokens/pass, {stats.tokens_per_s:.1f} tokens/s, "
        f"stop: {stats.stop_reason})"
    ]
    if stats.stop_reason == "context":
        lines.append(
            f"-- the prompt's {stats.prompt_tokens} tokens left room for only {stats.new_tokens} new ones in the "
            f"model's context of {context}: shorten the prompt to generate more"
        )
    if config.mode == "verify" and stats.drafted:
        positions = " / ".join(f"{100 * a:.0f}%" for a in stats.acceptance_by_position)
        shaped = {1: "marginal", 2: "pairs", 3: "triples"}
        sources = ", ".join(
            f"{shaped.get(k, k)} {v}" for k, v in sorted(stats.draft_orders.items(), reverse=True)
        )
        lines.append(
            f"-- verify: {stats.accepted} of {stats.drafted} drafts accepted ({100 * stats.acceptance_rate:.0f}%; "
            f"by draft position {positions}), {stats.mean_emitted:.2f} tokens emitted per pass; "
            f"drafts from {sources}"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
