"""One artifact on two execution providers, and with and without IO binding: the GPU check's figures.

    python -m dynamo_bench.providers --fp32 out/t3-fp32 --fp16 out/t3-fp16 --provider cuda --json check.json

Three checks (scripts/device_check.sh runs them on a GPU machine; on CPU they run the same code):

1. Logits parity. Each artifact on `--provider` against the fp32 artifact on the CPU provider, fed
   the same tokens: each paper prompt in one prefill pass, then the tokens greedy `ar` continues
   it with on the reference, fed in passes of 1 and 3 tokens (every pass kind the modes use), each
   side through its own KV cache. Every head's logits at every fed position: the max |Δ| and the
   top-1 agreement per head. Bounds (TOLERANCES): fp32 top-1 >= 0.99 and max |Δ| <= 0.1, loose
   because ONNX Runtime's CUDA provider multiplies fp32 matrices in TF32 by default (10-bit
   mantissas; the CPU provider does not); fp16 and int8 top-1 >= 0.95 / 0.90, as the exporter
   holds them against PyTorch (converters/verify.py). A wrong cache or position shows as top-1
   collapse, far outside these.
2. IO binding. Each artifact on `--provider` through the IO-binding path (GraphSession(io_binding=
   True): the cache stays in ORT's device buffers) against the plain path that feeds and fetches
   numpy arrays (io_binding=False), same provider: the same kernels on the same numbers, so
   generate() must return the same tokens for the same seed in every mode (ar, dynamic at the
   artifact's eps_b, verify), on every prompt and seed. On CPU, io_binding=True runs CUDA's code
   path with CPU buffers.
3. Provider agreement (reported, not required). The fp32 artifact on `--provider` against the CPU
   provider, generate() per mode, prompt and seed: how many generations are token-identical and
   where the first one diverges. TF32 moves logits by ~1e-3, enough to flip a sampled token at a
   near-tie now and then, after which the streams part; check 1 bounds the difference itself.

Prints a markdown summary; exits 1 when check 1 or 2 fails, 2 on an error (one line).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dynamo_bench.errors import BenchError
from dynamo_bench.prompts import PAPER_PROMPTS
from runtime import DynaMoRuntime, SamplingConfig
from runtime.atomic import atomic_write_json
from runtime.contract import CUDA_PROVIDER, DEVICES
from runtime.errors import DynaMoRuntimeError
from runtime.manifest import read_manifest
from runtime.session import GraphSession

STEPS = (1, 3)  # tokens fed per pass after the prefill, in turn
CONTINUATION = 24  # greedy tokens fed after each prompt in the parity schedule
EXIT_FAILED = 1
EXIT_ERROR = 2


@dataclass(frozen=True)
class Tolerance:
    max_abs_diff: float | None  # bound on every head's logits; None: reported only
    min_top1: float  # bound on each head's argmax agreement over the fed positions


TOLERANCES = {
    "fp32": Tolerance(max_abs_diff=0.1, min_top1=0.99),
    "fp16": Tolerance(max_abs_diff=None, min_top1=0.95),
    "int8": Tolerance(max_abs_diff=None, min_top1=0.90),
    "int4": Tolerance(max_abs_diff=None, min_top1=0.60),  # as converters/verify.py holds int4 exports
}


def load_runtime(
    artifact: str | Path, provider: str, threads: int | None = None, io_binding: bool | None = None
) -> DynaMoRuntime:
    """DynaMoRuntime.load (every check of the artifact), then its session on the path asked for."""
    rt = DynaMoRuntime.load(artifact, provider=provider, threads=threads)
    if io_binding is not None and io_binding != rt.session.io_binding:
        graph = str(rt.root / rt.manifest.graph.file)
        rt.session = GraphSession(
            graph, rt.manifest, provider=provider, threads=threads, io_binding=io_binding
        )
    check_session_provider(rt, provider)
    return rt


def check_session_provider(rt: DynaMoRuntime, provider: str) -> None:
    """ONNX Runtime falls back to the CPU, with only a log line, when the CUDA provider's libraries do not
    load: a CUDA figure must come from a session that really runs on CUDA."""
    if provider == "cuda" and CUDA_PROVIDER not in rt.session.session.get_providers():
        raise BenchError(
            f"the CUDA execution provider did not load for {rt.root} (ONNX Runtime fell back to "
            f"{rt.session.session.get_providers()}): its CUDA/cuDNN libraries were not found; call "
            "onnxruntime.preload_dlls() before loading, or put them on LD_LIBRARY_PATH"
        )


def prompt_ids(rt: DynaMoRuntime, count: int) -> list[list[int]]:
    """The first `count` paper prompts as token ids (fixed ids where the artifact has no tokenizer)."""
    if rt.tokenizer is None:
        vocab = rt.manifest.model.vocab_size
        return [[(7 * i + j) % vocab for j in range(5)] for i in range(count)]
    return [rt.tokenizer.encode(text).ids for text in PAPER_PROMPTS[:count]]


def schedule(rt: DynaMoRuntime, prompt: Sequence[int], continuation: int = CONTINUATION) -> list[list[int]]:
    """The passes of one parity case: the prompt, then greedy ar's continuation in passes of STEPS tokens."""
    greedy = rt.default_config.replace(mode="ar", temperature=0.0)
    room = rt.manifest.model.context_length - len(prompt) - 1
    tokens = rt.generate(list(prompt), max(1, min(continuation, room)), greedy, seed=0).token_ids
    passes, i = [list(prompt)], 0
    while tokens:
        step = STEPS[i % len(STEPS)]
        passes.append(tokens[:step])
        tokens, i = tokens[step:], i + 1
    return passes


def _logits(session: GraphSession, passes: list[list[int]]) -> np.ndarray:
    """Every head's logits at every fed position, in float32: (n_heads, positions, V)."""
    cache, position, out = session.empty_cache(), 0, []
    for tokens in passes:
        out.append(session.forward(cache, tokens, list(range(position, position + len(tokens)))))
        position += len(tokens)
    return np.concatenate(out, axis=1).astype(np.float32)


@dataclass
class Parity:
    name: str
    tolerance: Tolerance
    positions: int = 0
    max_abs_diff: list[float] = field(default_factory=list)  # per head
    top1_agreement: list[float] = field(default_factory=list)  # per head
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def logits_parity(
    name: str,
    reference: GraphSession,
    candidate: GraphSession,
    cases: list[list[list[int]]],
    tolerance: Tolerance,
) -> Parity:
    """Compare `candidate` with `reference` over every pass of every case; failures named per head."""
    if reference.manifest.model.num_token_heads != candidate.manifest.model.num_token_heads:
        raise BenchError(
            f"{name}: the two artifacts have different numbers of token heads: export both from one model"
        )
    ref = np.concatenate([_logits(reference, passes) for passes in cases], axis=1)  # (H, P, V)
    got = np.concatenate([_logits(candidate, passes) for passes in cases], axis=1)  # (H, P, V)
    if ref.shape != got.shape:
        raise BenchError(
            f"{name}: logits shapes differ, {ref.shape} vs {got.shape}: export both from one model"
        )
    result = Parity(name, tolerance, positions=ref.shape[1])
    result.max_abs_diff = [float(d) for d in np.abs(ref - got).max(axis=(1, 2))]
    result.top1_agreement = [float(a) for a in (ref.argmax(-1) == got.argmax(-1)).mean(axis=1)]
    for head, (diff, top1) in enumerate(zip(result.max_abs_diff, result.top1_agreement, strict=True), 1):
        if not np.isfinite(diff):
            result.failures.append(f"head {head}: non-finite logits")
        elif tolerance.max_abs_diff is not None and diff > tolerance.max_abs_diff:
            result.failures.append(f"head {head}: max |Δlogits| {diff:.3g} > {tolerance.max_abs_diff:g}")
        if top1 < tolerance.min_top1:
            result.failures.append(f"head {head}: top-1 agreement {top1:.3f} < {tolerance.min_top1:g}")
    return result


def mode_configs(rt: DynaMoRuntime) -> dict[str, SamplingConfig]:
    """ar, and where the artifact has several heads dynamic (at its default eps_b) and verify."""
    base = rt.default_config
    if rt.manifest.model.num_token_heads == 1:
        return {"ar": base.replace(mode="ar")}
    return {mode: base.replace(mode=mode) for mode in ("ar", "dynamic", "verify")}


@dataclass
class Agreement:
    name: str
    required: bool  # a failure of a required agreement fails the check
    generations: dict[str, int] = field(default_factory=dict)  # mode -> generations compared
    equal: dict[str, int] = field(default_factory=dict)  # mode -> token-identical generations
    divergences: list[dict] = field(default_factory=list)  # mode, prompt, seed, first differing token

    @property
    def passed(self) -> bool:
        return not self.required or all(self.equal[m] == n for m, n in self.generations.items())

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def generation_agreement(
    name: str,
    left: DynaMoRuntime,
    right: DynaMoRuntime,
    prompts: list[list[int]],
    seeds: Sequence[int],
    max_new_tokens: int,
    required: bool,
) -> Agreement:
    """generate() on both runtimes for every mode, prompt and seed; which generations are identical."""
    result = Agreement(name, required)
    for mode, config in mode_configs(left).items():
        result.generations[mode] = result.equal[mode] = 0
        for index, prompt in enumerate(prompts):
            for seed in seeds:
                a = left.generate(prompt, max_new_tokens, config, seed).token_ids
                b = right.generate(prompt, max_new_tokens, config, seed).token_ids
                result.generations[mode] += 1
                if a == b:
                    result.equal[mode] += 1
                    continue
                first = next(
                    (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
                )
                result.divergences.append({"mode": mode, "prompt": index, "seed": seed, "token": first})
    return result


@dataclass(frozen=True)
class CheckOptions:
    fp32: str
    fp16: str | None = None
    provider: str = "cuda"
    threads: int | None = None
    prompts: int = 4
    seeds: tuple[int, ...] = (0, 1)
    max_new_tokens: int = 32


def run_checks(options: CheckOptions) -> dict:
    """Checks 1-3 of the module docstring; a JSON-ready dictionary with `passed`."""
    reference = load_runtime(options.fp32, "cpu", options.threads, io_binding=False)
    prompts = prompt_ids(reference, options.prompts)
    cases = [schedule(reference, p) for p in prompts]
    artifacts = {"fp32": options.fp32, **({"fp16": options.fp16} if options.fp16 else {})}
    parity, binding = [], []
    for label, path in artifacts.items():
        dtype = read_manifest(Path(path)).graph.dtype
        bound = load_runtime(path, options.provider, options.threads, io_binding=True)
        plain = load_runtime(path, options.provider, options.threads, io_binding=False)
        parity.append(
            logits_parity(
                f"{label} on {options.provider} vs fp32 on cpu",
                reference.session,
                bound.session,
                cases,
                TOLERANCES[dtype],
            )
        )
        binding.append(
            generation_agreement(
                f"{label} on {options.provider}: IO binding vs plain path",
                bound,
                plain,
                prompts,
                options.seeds,
                options.max_new_tokens,
                required=True,
            )
        )
    on_provider = load_runtime(options.fp32, options.provider, options.threads)
    across = generation_agreement(
        f"fp32 on {options.provider} vs fp32 on cpu",
        on_provider,
        reference,
        prompts,
        options.seeds,
        options.max_new_tokens,
        required=False,
    )
    checks = [*parity, *binding, across]
    return {
        "provider": options.provider,
        "artifacts": artifacts,
        "parity": [p.to_dict() for p in parity],
        "io_binding": [b.to_dict() for b in binding],
        "provider_agreement": across.to_dict(),
        "passed": all(c.passed for c in checks),
    }


def _row(values: Sequence[float], digits: int = 3) -> str:
    return " / ".join(f"{v:.{digits}g}" for v in values)


def summary_markdown(result: dict) -> str:
    lines = [
        f"## Provider check: {result['provider']}",
        "",
        "| logits parity | positions | max abs diff per head | top-1 agreement per head | bound | result |",
        "|---|---|---|---|---|---|",
    ]
    for p in result["parity"]:
        tol = p["tolerance"]
        bound = f"top-1 >= {tol['min_top1']:g}" + (
            f", max diff <= {tol['max_abs_diff']:g}" if tol["max_abs_diff"] is not None else ""
        )
        verdict = "pass" if p["passed"] else "FAIL: " + "; ".join(p["failures"])
        lines.append(
            f"| {p['name']} | {p['positions']} | {_row(p['max_abs_diff'])} | {_row(p['top1_agreement'], 4)} "
            f"| {bound} | {verdict} |"
        )
    lines += ["", "| generations | " + " | ".join(("ar", "dynamic", "verify")) + " | required | result |"]
    lines.append("|---|---|---|---|---|---|")
    for a in [*result["io_binding"], result["provider_agreement"]]:
        cells = [
            f"{a['equal'][m]}/{a['generations'][m]} identical" if m in a["generations"] else "–"
            for m in ("ar", "dynamic", "verify")
        ]
        first = a["divergences"][:3]
        where = "; ".join(
            f"{d['mode']} prompt {d['prompt']} seed {d['seed']} from token {d['token']}" for d in first
        )
        verdict = ("pass" if a["passed"] else "FAIL") if a["required"] else "reported"
        lines.append(
            f"| {a['name']} | {' | '.join(cells)} | {'yes' if a['required'] else 'no'} | {verdict}"
            + (f" (first divergences: {where})" if where else "")
            + " |"
        )
    lines += ["", f"Overall: {'PASSED' if result['passed'] else 'FAILED'}."]
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dynamo_bench.providers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--fp32", required=True, help="the fp32 artifact (also the CPU reference)")
    p.add_argument("--fp16", help="an fp16 artifact of the same model")
    p.add_argument("--provider", choices=DEVICES, default="cuda")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    p.add_argument("--prompts", type=int, default=4, help="paper prompts to use (default 4)")
    p.add_argument("--seeds", type=_ints, default=(0, 1), help="comma-separated sampling seeds")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", help="write the full result here (atomically)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.prompts <= len(PAPER_PROMPTS) or args.max_new_tokens < 1 or not args.seeds:
        print(
            f"dynamo-bench providers: error: --prompts must lie in 1..{len(PAPER_PROMPTS)}, "
            "--max-new-tokens >= 1 and --seeds non-empty",
            file=sys.stderr,
        )
        return EXIT_ERROR
    options = CheckOptions(
        args.fp32, args.fp16, args.provider, args.threads, args.prompts, args.seeds, args.max_new_tokens
    )
    try:
        result = run_checks(options)
    except (BenchError, DynaMoRuntimeError) as exc:
        print(f"dynamo-bench providers: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(summary_markdown(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0 if result["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
