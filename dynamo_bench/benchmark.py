"""run_benchmark: one artifact in every requested mode, side by side with its baselines, timed and judged.

The steps (each in its own module):
1. prompts (prompts.py): the paper's ten, in-domain ones cut from held-out text, or a file;
2. runners: the artifact in `ar` (always: every speed-up divides by it), `dynamic` at each eps_b and
   `verify`; with a base checkpoint, Optimum's ORTModelForCausalLM and PyTorch (baselines.py),
   where torch (and Optimum) are installed: elsewhere they are skipped and the result says so
   (`skipped`, extras.py);
3. timing (latency.py): warm-up, then interleaved rounds over prompts x seeds;
4. quality (quality.py, judges.py): the first round's generations, judged by perplexity under the
   judge model, by MAUVE against the human continuations and by self-BLEU, each per seed;
5. derived figures: speed-ups, the same-quality speed-up, PPL_d, verify's speculative figures and
   its greedy agreement with ar (speculative.py); plus the environment record (env.py).
The result is one JSON-ready dictionary; report.py turns it into markdown and a plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dynamo_bench import ablation, judges, latency, prompts, quality, speculative
from dynamo_bench.env import environment_record
from dynamo_bench.errors import BenchError
from dynamo_bench.extras import Skipped, unavailable
from dynamo_bench.providers import check_session_provider
from runtime import DynaMoRuntime
from runtime.manifest import MANIFEST_NAME

SCHEMA = "dynamo-bench/1"
MODES = ("ar", "dynamic", "verify")


@dataclass(frozen=True)
class BenchOptions:
    artifact: str
    provider: str = "cpu"
    threads: int | None = None
    prompts_file: str | None = None
    in_domain: str | None = None  # held-out corpus directory: in-domain prompts and PPL_d
    num_in_domain: int = 10
    in_domain_tokens: int = 8
    max_new_tokens: int = 64
    eps_b: tuple[float, ...] = (0.25, 0.5, 0.75)
    modes: tuple[str, ...] = MODES
    repeats: int = 3
    warmup: int = 1
    seeds: tuple[int, ...] = (0, 1, 2)
    baseline: str | None = None  # the base model's checkpoint directory
    judge: str | None = None  # artifact or checkpoint; default: the baseline, else the artifact's head 1
    ablation: float | None = None  # eps_b of the Table 9 variants (dynamo_bench/ablation.py); None: not run
    progress: bool = True
    skipped: tuple[Skipped, ...] = ()  # parts the caller already knows it cannot run (the CLI's plot)

    def validate(self) -> None:
        """Raise BenchError naming every bad option at once."""
        problems = []
        if unknown := sorted(set(self.modes) - set(MODES)):
            problems.append(f"--modes {unknown} unknown; choose from {list(MODES)}")
        if "dynamic" in self.modes and not self.eps_b:
            problems.append("--modes dynamic needs at least one --eps-b value")
        if bad := [e for e in self.eps_b if not 0 <= e <= 1]:
            problems.append(f"--eps-b values {bad} must lie in [0, 1]")
        if self.ablation is not None and not 0 <= self.ablation <= 1:
            problems.append(f"--ablation {self.ablation} must lie in [0, 1] (an eps_b)")
        if self.max_new_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            problems.append("--max-new-tokens and --repeats must be >= 1 and --warmup >= 0")
        if not self.seeds:
            problems.append("--seeds needs at least one seed")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads {self.threads} must be >= 1")
        if self.prompts_file and self.in_domain:
            problems.append(
                "--prompts replaces the built-in prompt sets: drop --in-domain, or drop --prompts"
            )
        if problems:
            raise BenchError("invalid dynamo-bench options: " + "; ".join(problems))


def _prompt_set(options: BenchOptions, tokenizer) -> list[prompts.Prompt]:
    if tokenizer is None:
        raise BenchError(
            f"{options.artifact} has no tokenizer.json: dynamo-bench needs one to encode prompts"
        )
    if options.prompts_file:
        return prompts.file_prompts(options.prompts_file, tokenizer)
    chosen = prompts.paper_prompts(tokenizer)
    if options.in_domain:
        chosen += prompts.in_domain_prompts(
            options.in_domain,
            tokenizer,
            options.num_in_domain,
            options.in_domain_tokens,
            options.max_new_tokens,
        )
    return chosen


def _runtime_runners(options: BenchOptions, rt: DynaMoRuntime) -> tuple[dict, dict]:
    heads = rt.manifest.model.num_token_heads
    if heads == 1 and set(options.modes) - {"ar"}:
        raise BenchError(
            f"{options.artifact} has one token head: only --modes ar applies (export a DynaMo model)"
        )
    base = rt.default_config
    configs = {"ar": base.replace(mode="ar")}
    if "dynamic" in options.modes:
        configs.update({f"dynamic eps_b={e:g}": base.replace(mode="dynamic", eps_b=e) for e in options.eps_b})
    if "verify" in options.modes:
        configs["verify"] = base.replace(mode="verify")  # drafts from the conditioned joint
        if base.alpha_c != 0 and rt.masks is not None:  # the comparison: drafts from the marginals
            configs["verify alpha_c=0"] = base.replace(mode="verify", alpha_c=0.0)
    if options.ablation is not None:
        if heads == 1 or rt.masks is None:
            raise BenchError(
                f"--ablation compares dynamic mode with and without co-occurrence masks: {options.artifact} "
                "needs 2+ token heads and masks (dynamo-export --cooccurrence DIR)"
            )
        configs.update(ablation.configs(base, options.ablation))
    meta = {
        k: {
            "kind": "runtime",
            "mode": c.mode,
            "eps_b": c.eps_b if c.mode == "dynamic" else None,
            "sampling": c.to_dict(),
        }
        for k, c in configs.items()
    }
    return {k: latency.RuntimeRunner(rt, c) for k, c in configs.items()}, meta


def _check_lengths(chosen: Sequence[prompts.Prompt], max_new_tokens: int, context: int) -> None:
    longest = max(len(p.ids) for p in chosen)
    if longest + max_new_tokens > context:
        raise BenchError(
            f"the longest prompt ({longest} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's "
            f"context of {context}: shorten the prompts or lower --max-new-tokens"
        )


@dataclass(frozen=True)
class _Plan:
    """Which torch-side parts run here: the baselines, and the judge that needs PyTorch."""

    pytorch: bool  # the PyTorch baseline
    optimum: bool  # the Optimum baseline
    torch_judge: bool  # judge with a checkpoint in PyTorch (--judge CHECKPOINT, or the baseline)
    mauve: bool  # MAUVE against the human continuations (judges.py)
    self_bleu: bool
    skipped: tuple[Skipped, ...]


def _plan(options: BenchOptions) -> _Plan:
    skipped = list(options.skipped)
    pytorch = optimum = False
    if options.baseline:
        no_torch = unavailable("pytorch", "the PyTorch baseline")
        no_optimum = unavailable("optimum", "the Optimum baseline")
        optimum, pytorch = no_optimum is None, no_torch is None
        skipped += [s for s in (no_optimum, no_torch) if s is not None]
    judge = options.judge or options.baseline
    torch_judge = bool(judge) and not (Path(judge) / MANIFEST_NAME).is_file()
    if torch_judge:
        no_torch = unavailable(
            "pytorch", f"judging with the checkpoint {judge}", "the artifact's own head 1 judges instead"
        )
        if no_torch is not None:
            torch_judge = False
            skipped.append(no_torch)
    no_mauve = unavailable("mauve", "MAUVE against the human continuations")
    no_self_bleu = unavailable("self_bleu", "self-BLEU")
    skipped += [s for s in (no_mauve, no_self_bleu) if s is not None]
    return _Plan(pytorch, optimum, torch_judge, no_mauve is None, no_self_bleu is None, tuple(skipped))


def _judge(options: BenchOptions, plan: _Plan, base_model):
    if options.judge and (plan.torch_judge or (Path(options.judge) / MANIFEST_NAME).is_file()):
        return quality.make_judge(options.judge, options.provider, options.threads)
    if plan.torch_judge and options.baseline:
        return quality.TorchJudge(options.baseline, model=base_model)
    # No base model given, or none that can run here: the artifact's own head 1 (the base model up to
    # T3's fine-tuning), on ONNX Runtime.
    return quality.OrtJudge(options.artifact, options.provider, options.threads)


def run_benchmark(options: BenchOptions) -> dict:
    options.validate()
    plan = _plan(options)
    if options.threads is not None and (plan.pytorch or plan.optimum or plan.torch_judge):
        import torch

        torch.set_num_threads(options.threads)
    rt = DynaMoRuntime.load(options.artifact, provider=options.provider, threads=options.threads)
    check_session_provider(rt, options.provider)
    chosen = _prompt_set(options, rt.tokenizer)
    _check_lengths(chosen, options.max_new_tokens, rt.manifest.model.context_length)
    runners, meta = _runtime_runners(options, rt)
    base_model = None
    if plan.pytorch or plan.optimum:
        from dynamo_bench import baselines  # imports torch: only where it is installed

        base_model = baselines.load_torch_base(options.baseline)
        defaults = rt.default_config
        if plan.optimum:
            runners["optimum"] = baselines.optimum_runner(
                base_model, defaults, options.threads, options.provider
            )
        if plan.pytorch:
            runners["pytorch"] = baselines.pytorch_runner(base_model, defaults)
        for kind in ("optimum", "pytorch"):
            if kind in runners:
                sampling = defaults.replace(mode="ar").to_dict()  # what the baselines do: one token a pass
                meta[kind] = {"kind": kind, "mode": "ar", "eps_b": None, "sampling": sampling}

    measured = latency.measure(
        runners,
        chosen,
        options.seeds,
        options.max_new_tokens,
        options.repeats,
        options.warmup,
        options.progress,
    )
    judge = _judge(options, plan, base_model)
    score = quality.Scorer(judge)
    in_domain = [p for p in chosen if p.set_name == "in-domain"]
    text_judges = (
        judges.TextJudges(
            lambda ids: rt.tokenizer.decode(list(ids)),
            {"in-domain": [p.reference for p in in_domain]} if in_domain else {},
            mauve=plan.mauve,
            self_bleu=plan.self_bleu,
        )
        if plan.mauve or plan.self_bleu
        else None
    )

    runs = {}
    for label, calls in tqdm(
        measured.calls.items(), desc="judge", unit="runner", disable=not options.progress
    ):
        runs[label] = {
            **meta[label],
            "latency": latency.summarize(
                calls, measured.peak_rss_bytes[label], measured.rss_growth_bytes[label]
            ),
            "quality": quality.quality_of(calls, chosen, score, text_judges),
            "calls": _call_records(calls, rt.tokenizer),
        }
    lat = {k: r["latency"] for k, r in runs.items()}
    speedups = latency.speedups(lat, [r for r in ("ar", "optimum", "pytorch") if r in runs])
    # The same-quality speed-up picks among the modes a user runs, not the ablation's variants.
    sweep = [k for k, r in runs.items() if r["kind"] == "runtime" and not ablation.is_ablation(k)]
    tokens_per_pass = {k: r["latency"]["tokens_per_pass"] for k, r in runs.items()}
    qualities = {k: r["quality"] for k, r in runs.items()}
    return {
        "schema": SCHEMA,
        "environment": {
            **environment_record(options.artifact, rt.provider, options.threads),
            "session_providers": rt.session.session.get_providers(),  # what ORT really runs on
        },
        "settings": {
            "max_new_tokens": options.max_new_tokens,
            "repeats": options.repeats,
            "warmup": options.warmup,
            "seeds": list(options.seeds),
            "eps_b": list(options.eps_b),
            "ablation_eps_b": options.ablation,
            "modes": list(options.modes),
            "baseline": options.baseline,
            "judge": judge.name,
            "prompt_counts": {
                s: sum(p.set_name == s for p in chosen) for s in dict.fromkeys(p.set_name for p in chosen)
            },
            "prompts": [{"set": p.set_name, "text": p.text, "ids": list(p.ids)} for p in chosen],
        },
        "skipped": [s.to_dict() for s in plan.skipped],
        "runners": runs,
        "speedups": speedups,
        "same_quality": quality.same_quality(qualities, speedups, tokens_per_pass, sweep),
        "speculative": speculative.figures(runs, speedups),
        "greedy_verify_equals_ar": (
            speculative.greedy_agreement(rt, chosen, options.max_new_tokens) if "verify" in runs else None
        ),
        "ppl_d": quality.ppl_d(
            qualities, sweep, quality.reference_ppl(in_domain, score) if in_domain else None
        ),
        "ablation": (
            ablation.summarise(runs, speedups, options.ablation) if options.ablation is not None else None
        ),
    }


def _call_records(calls: Sequence[latency.Call], tokenizer) -> list[dict]:
    """Per (prompt, seed): the first round's tokens, text and stats, and every round's timings."""
    records: dict[tuple[int, int], dict] = {}
    for c in sorted(calls, key=lambda c: c.repeat):
        key = (c.prompt_index, c.seed)
        if key not in records:
            records[key] = {
                "prompt": c.prompt_index,
                "seed": c.seed,
                "token_ids": list(c.sample.token_ids),
                "text": tokenizer.decode(list(c.sample.token_ids)) if tokenizer is not None else None,
                "stats": c.sample.stats,
                "wall_s": [],
                "prefill_s": [],
            }
        records[key]["wall_s"].append(c.sample.wall_s)
        records[key]["prefill_s"].append(c.sample.prefill_s)
    return list(records.values())
