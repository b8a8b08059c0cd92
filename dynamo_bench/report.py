"""The benchmark's outputs: JSON for machines, markdown tables for issues, and the speed-up/quality plot.

Everything here only formats what `dynamo_bench.benchmark` measured and
derived; no figure is computed from anything but the result dictionary.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from dynamo_bench import ablation
from runtime.atomic import atomic_write_bytes

__all__ = [
    "bench_markdown",
    "device_line",
    "plot_emission_shares",
    "plot_speedup_vs_quality",
    "scale_markdown",
]


def _f(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _shares(latency: dict) -> str:
    shares = latency.get("emission_share")
    if not shares:
        return "–"
    return " / ".join(f"{100 * shares.get(str(k), 0.0):.0f}" for k in (1, 2, 3))


def latency_table(result: dict) -> str:
    header = [
        "runner",
        "prefill ms",
        "decode ms/pass",
        "decode ms/token",
        "tokens/s best",
        "tokens/s median",
        "tokens/pass",
        "1/2/3-token passes %",
        "back-offs/pass",
        "accepted drafts",
        "ORT / sampling % of decode",
        "peak RSS MB (+growth)",
    ]
    rows = []
    for label, run in result["runners"].items():
        lat = run["latency"]
        split = (
            f"{_f(100 * lat['ort_share']['median'], 0)} / {_f(100 * lat['sampling_share']['median'], 0)}"
            if lat["ort_share"]["median"] is not None
            else "–"
        )
        rows.append(
            [
                label,
                _f(lat["prefill_ms"]["median"]),
                _f(lat["decode_ms_per_pass"]["median"]),
                _f(lat["decode_ms_per_token"]["median"]),
                _f(lat["tokens_per_s"]["best"], 1),
                _f(lat["tokens_per_s"]["median"], 1),
                _f(lat["tokens_per_pass"]),
                _shares(lat),
                _f(lat.get("backoffs_per_pass")),
                _f(None if lat.get("acceptance_rate") is None else 100 * lat["acceptance_rate"], 0, "%"),
                split,
                f"{_f(lat['peak_rss_mb'], 0)} (+{_f(lat['rss_growth_mb'], 1)})",
            ]
        )
    return _table(header, rows)


def _pair(row: dict | None, digits: int = 2) -> str:
    if not row or row.get("p50") is None:
        return "–"
    return f"{_f(row['p50'], digits)} / {_f(row['p90'], digits)}"


def per_call_table(result: dict) -> str:
    """p50 / p90 over calls of each call's time to first token and mean time per pass and per token."""
    header = ["runner", "TTFT ms", "decode ms/pass", "decode ms/token", "calls"]
    rows = []
    for label, run in result["runners"].items():
        per_call = run["latency"].get("per_call")
        if per_call is None:  # a result from before per-call figures
            continue
        rows.append(
            [
                label,
                _pair(per_call["ttft_ms"]),
                _pair(per_call["decode_ms_per_pass"]),
                _pair(per_call["decode_ms_per_token"]),
                str(per_call["ttft_ms"]["calls"]),
            ]
        )
    return _table(header, rows)


def speedup_table(result: dict) -> str:
    refs = [r for r in ("ar", "optimum", "pytorch") if r in result["runners"]]
    header = ["runner", *[f"wall-clock vs {r}" for r in refs], "tokens/pass"]
    rows = []
    for label, run in result["runners"].items():
        sp = result["speedups"][label]
        rows.append(
            [label, *[_f(sp[f"vs_{r}"], 2, "×") for r in refs], _f(run["latency"]["tokens_per_pass"])]
        )
    return _table(header, rows)


def speculative_section(result: dict) -> str:
    """verify's figures as ORT GenAI's speculative benchmark reports them, and the greedy check."""
    header = [
        "runner",
        "alpha_c",
        "acceptance",
        "acceptance by draft position",
        "mean emitted / pass",
        "tokens/pass",
        "pass cost vs ar",
        "estimated vs ar",
        "observed vs ar",
    ]
    rows = []
    for label, fig in result.get("speculative", {}).items():
        positions = fig["acceptance_by_position"] or []
        rows.append(
            [
                label,
                f"{fig['alpha_c']:g}",
                _f(None if fig["acceptance_rate"] is None else 100 * fig["acceptance_rate"], 0, "%"),
                " / ".join(_f(None if a is None else 100 * a, 0, "%") for a in positions) or "–",
                _f(fig["mean_emitted"]),
                _f(fig["tokens_per_pass"]),
                _f(fig["pass_cost_vs_ar"], 2, "×"),
                _f(fig["estimated_speedup"], 2, "×"),
                _f(fig["observed_speedup"], 2, "×"),
            ]
        )
    greedy = result.get("greedy_verify_equals_ar")
    check = (
        f"Greedy verify equals greedy ar token for token on {greedy['equal']} of {greedy['prompts']} prompts"
        + (f" (differing: {greedy['differing_prompts']})." if greedy["differing_prompts"] else ".")
        if greedy
        else ""
    )
    return _table(header, rows) + ("\n\n" + check if check else "")


def quality_table(result: dict) -> str:
    sets = [
        s
        for s in ("paper", "in-domain", "file")
        if any(s in r["quality"]["by_set"] for r in result["runners"].values())
    ]
    judged = [
        (s, m)
        for s in sets
        for m in ("mauve", "self_bleu")
        if any(r["quality"]["by_set"].get(s, {}).get(m) is not None for r in result["runners"].values())
    ]
    header = [
        "runner",
        *[f"judged PPL {s}" for s in sets],
        "judged PPL all (seeds min–max)",
        *[f"{'MAUVE' if m == 'mauve' else 'self-BLEU'} {s} (seeds min–max)" for s, m in judged],
        "distinct-2",
        "distinct-3",
        "seq-rep-4",
    ]
    rows = []
    for label, run in result["runners"].items():
        by_set = run["quality"]["by_set"]
        every = by_set["all"]
        rows.append(
            [
                label,
                *[_f(by_set.get(s, {}).get("judged_ppl")) for s in sets],
                _with_spread(every, "judged_ppl", 2),
                *[_with_spread(by_set.get(s, {}), m, 3) for s, m in judged],
                _f(every["distinct_2"], 3),
                _f(every["distinct_3"], 3),
                _f(every["seq_rep_4"], 3),
            ]
        )
    return _table(header, rows)


def _with_spread(row: dict, metric: str, digits: int) -> str:
    seeds = [v for v in (row.get(f"{metric}_per_seed") or {}).values() if v is not None]
    spread = f" ({min(seeds):.{digits}f}–{max(seeds):.{digits}f})" if len(seeds) > 1 else ""
    return _f(row.get(metric), digits) + spread


RULE_SEEDS = 5  # the seeds at which the same-quality rule accepts ar's own distribution 9 times in 10
METRIC_NAMES = {"mauve": "MAUVE", "self_bleu": "self-BLEU", "judged_ppl": "judged PPL"}


def same_quality_section(sq: dict) -> str:
    if not sq["metrics"]:
        return "Not decided: the rule compares with ar's seed-to-seed spread, which needs 2 or more --seeds."
    bands = "; ".join(
        f"{METRIC_NAMES[m]} {_f(sq['ar'][m], 3)} (band {sq['ar_band'][m][0]:.3f}–{sq['ar_band'][m][1]:.3f})"
        for m in sq["metrics"]
    )
    lines = [
        f"Read on the {sq['prompt_set']} prompts. ar: {bands}. A runner has ar's quality when each of these "
        f"lies within ar's band: its figure ± {sq['spread_sds']:g} standard deviations of its per-seed values.",
        "",
    ]
    if sq["seeds"] < RULE_SEEDS:
        lines[-1:] = [
            "",
            f"With {sq['seeds']} seeds the spread is a rough estimate: a runner sampling ar's own distribution "
            f"passes all three figures only about 2 times in 3 (9 in 10 at {RULE_SEEDS} seeds): use --seeds with "
            f"{RULE_SEEDS} or more for this decision.",
            "",
        ]
    for key, what in (("wall_clock", "wall-clock speed-up vs ar"), ("tokens_per_pass", "tokens per pass")):
        best = sq[key]
        lines.append(
            f"- **Same-quality {what}**: "
            + (
                "none of the sweep qualifies"
                if best is None
                else f"**{best['value']:.2f}** ({best['runner']})"
            )
        )
    rows = []
    for label, c in sq["candidates"].items():
        rows.append(
            [
                label,
                *[_f(c[m], 3) + ("" if c["within"][m] else " ✗") for m in sq["metrics"]],
                "yes" if c["same_quality"] else "no",
                _f(c["wall_speedup_vs_ar"], 2, "×"),
                _f(c["tokens_per_pass"]),
            ]
        )
    header = [
        "runner",
        *[METRIC_NAMES[m] for m in sq["metrics"]],
        "ar's quality",
        "wall-clock vs ar",
        "tokens/pass",
    ]
    return "\n".join(lines) + "\n\n" + _table(header, rows) + "\n\n✗: outside ar's band."


def ppl_d_section(result: dict) -> str:
    pd = result["ppl_d"]
    rows = [
        [label, _f(value), _f(result["runners"][label]["latency"]["tokens_per_pass"])]
        for label, value in pd["ppl_d"].items()
    ]
    anchor = f"Judge's PPL of the held-out paragraphs' true continuations: {_f(pd['heldout_reference_ppl'])}."
    return anchor + "\n\n" + _table(["runner", "PPL_d", "tokens/pass"], rows)


DEFINITIONS = """\
- Judged PPL: exp of the mean negative log-likelihood the judge (the base model, temperature 1) gives the
  continuation tokens, prompt + continuation in one pass; pooled over prompts and seeds, token-weighted.
- MAUVE: between a runner's continuations of the in-domain prompts and the held-out paragraphs' true
  continuations of the same length, on all-MiniLM-L6-v2 sentence embeddings (mauve-text); per seed, then
  the mean over seeds. 1 = indistinguishable at this sample size.
- self-BLEU: mean BLEU (sacrebleu, 0..1) of each generation of a prompt set against the set's other
  generations of the same seed; higher = less diverse. Mean over seeds.
- Same-quality speed-up: the largest median wall-clock speed-up vs ar (and separately, the largest tokens per
  pass) among ar, dynamic at each eps_b and verify whose MAUVE, self-BLEU and judged PPL (in-domain set where
  present) each lie within ar's own seed-to-seed spread, two-sided: ar's figure ± 2 standard deviations of
  its per-seed values (not their min–max, which a lossless runner would leave half the time at 3 seeds).
- PPL_d: the judged PPL of what a runner emits when continuing held-out prefixes (the in-domain prompts).
- distinct-n: unique / all n-grams pooled over a runner's generations; seq-rep-4: share of a generation's
  4-grams that repeat an earlier one, averaged over generations.
- Timings: wall-clock of whole generate() calls; best = min time / max rate over rounds. Runtime prefill =
  first pass + its sampling; Optimum/PyTorch prefill = generate() start to the first streamed token.
- Peak RSS is the whole benchmark process (all runners share it); +growth is the rise during a runner's round.
- Per call: each timed call (every prompt, seed and round) gives its time to first token and its mean decode
  time per pass and per token; the tables give the 50th and 90th percentiles over those calls.
- verify: acceptance = accepted / drafted drafts; by draft position = accepted / checked, where position j is
  checked only if the drafts before it passed; estimated vs ar = (1 + a_1 + a_1 a_2) / (verify's decode
  ms per pass / ar's); observed = the measured tokens/s ratio. "verify" drafts from the co-occurrence-
  conditioned joint, "verify alpha_c=0" from the heads' marginals.
"""


def device_line(env: dict) -> str:
    """The device in one line: CPU (board), cores, memory, GPU, ONNX Runtime and its providers."""
    cpu = env["cpu_model"] + (f" ({env['device_model']})" if env.get("device_model") else "")
    cores = f"{env.get('physical_cores') or '?'} cores / {env['logical_cpus']} logical CPUs"
    parts = [cpu, cores]
    if env.get("memory_total_gb") is not None:
        parts.append(f"{env['memory_total_gb']:g} GB")
    for gpu in env.get("gpus") or []:
        parts.append(f"GPU {gpu['name']} ({gpu['memory']}, driver {gpu['driver']})")
    ort = env.get("onnxruntime")
    if ort:  # results written before the record named ONNX Runtime's providers give the version alone
        providers = ", ".join(p.removesuffix("ExecutionProvider") for p in ort["available_providers"])
        parts.append(f"onnxruntime {ort['version']} (providers: {providers})")
    else:
        parts.append(f"onnxruntime {env['versions']['onnxruntime']}")
    return "; ".join(parts)


def skipped_lines(result: dict) -> list[str]:
    return [f"- {s['note']}" for s in result.get("skipped", [])]


def bench_markdown(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    counts = ", ".join(f"{n} {k}" for k, n in s["prompt_counts"].items())
    torch = env["versions"]["torch"] or "not installed"
    parts = [
        f"# dynamo-bench: {env['artifact']}",
        "",
        f"Device: {device_line(env)}.",
        f"Run: provider {env['provider']}, {env['threads']} thread(s); numpy {env['versions']['numpy']}, "
        f"torch {torch}; manifest sha256 {str(env['manifest_sha256'])[:12]}, commit {env['git_commit']}.",
        f"Prompts: {counts}; seeds {s['seeds']}; {s['max_new_tokens']} new tokens; {s['repeats']} timed rounds "
        f"after {s['warmup']} warm-up call(s) per runner; judge: {s['judge']}.",
    ]
    if result.get("skipped"):
        parts += ["", "Skipped on this install:", *skipped_lines(result)]
    parts += [
        "",
        "## Latency (median over rounds unless marked best)",
        "",
        latency_table(result),
        "",
        "## Latency per call (p50 / p90 over every timed call: a call's time to first token, its mean decode "
        "time per pass and per token)",
        "",
        per_call_table(result),
        "",
        "## Wall-clock speed-ups (median tokens/s ratios, same prompts, seeds and lengths, same run)",
        "",
        speedup_table(result),
        "",
        "## verify: speculative decoding figures (acceptance per draft position is conditional)",
        "",
        speculative_section(result),
        "",
        "## Quality (judged perplexity = the base model's likelihood of the continuations)",
        "",
        quality_table(result),
        "",
        "## Same-quality speed-up",
        "",
        same_quality_section(result["same_quality"]),
        "",
    ]
    if result.get("ppl_d") and result["ppl_d"]["ppl_d"]:
        parts += ["## PPL_d over held-out prefixes", "", ppl_d_section(result), ""]
    if result.get("ablation"):
        ar_ppl = result["runners"]["ar"]["quality"]["by_set"]["all"]["judged_ppl"]
        parts += [ablation.markdown(result["ablation"], ar_ppl), ""]
    parts += ["## Definitions", "", DEFINITIONS]
    return "\n".join(parts)


def scale_markdown(scale: dict) -> str:
    header = [
        "size",
        "variant",
        "params (M)",
        "export s",
        "artifact MB",
        "bandwidth GB/s",
        "step ms @1",
        "step ms @3",
        "bound ms",
        "× bound @1",
        "× bound @3",
    ]
    rows = []
    for name, entry in scale["rows"].items():
        if entry["status"] != "ok":
            rows.append(
                [
                    name,
                    "base, t3",
                    "–",
                    "does not fit",
                    f"needs ~{entry['needed_gb']:.1f} GB, {entry['available_gb']:.1f} GB available",
                    "–",
                    "–",
                    "–",
                    "–",
                    "–",
                    "–",
                ]
            )
            continue
        for variant in ("base", "t3"):
            r = entry[variant]
            rows.append(
                [
                    name,
                    variant,
                    _f(r["params"] / 1e6, 1),
                    _f(r["export_s"], 1),
                    _f(r["artifact_mb"], 0),
                    _f(r["bandwidth_gb_s"], 1),
                    _f(r["step"]["1"]["min_ms"]),
                    _f(r["step"]["3"]["min_ms"]),
                    _f(r["bound_ms"]),
                    _f(r["ratio_to_bound"]["1"]),
                    _f(r["ratio_to_bound"]["3"]),
                ]
            )
    head = (
        f"Random-weight Pythia architectures, fp32, exported with verify=False; {scale['past_tokens']} past "
        f"tokens; ORT threads {scale['threads']}; step times are the minimum over repeats. Bandwidth: numpy copy "
        "(read + write, one thread), measured right before each row. Bound = weight bytes read per step (all "
        "but the input embedding) / bandwidth; × bound = step time / bound."
    )
    return "# dynamo-bench --scale\n\n" + head + "\n\n" + _table(header, rows) + "\n"


def plot_speedup_vs_quality(result: dict, path: str | os.PathLike) -> Path:
    """The paper's Fig. 3 analogue: each quality figure against wall-clock speed-up over the eps_b sweep.

    One panel per figure of the same-quality rule (MAUVE, self-BLEU, judged PPL, on its prompt
    set), ar's band shaded: a point inside the band on every panel has ar's quality.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runners, sq = result["runners"], result["same_quality"]
    set_name = sq["prompt_set"]
    metrics = [m for m in ("mauve", "self_bleu", "judged_ppl") if m in sq["metrics"]] or ["judged_ppl"]
    speed = {k: result["speedups"][k]["vs_ar"] for k in runners}
    dynamic = _dynamic_sweep(runners)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        value = {k: r["quality"]["by_set"][set_name].get(metric) for k, r in runners.items()}
        if metric in sq["ar_band"]:
            low, high = sq["ar_band"][metric]
            ax.axhspan(low, high, color="0.88", label=f"ar ± {sq['spread_sds']:g} seed SDs")
        points = [k for k in dynamic if value[k] is not None and speed[k] is not None]
        ax.plot(
            [speed[k] for k in points], [value[k] for k in points], "o-", color="C0", label="dynamic (eps_b)"
        )
        for k in points:
            ax.annotate(
                f"{runners[k]['eps_b']:g}", (speed[k], value[k]), textcoords="offset points", xytext=(4, 4)
            )
        verify = [
            (k, "s" if runners[k]["sampling"]["alpha_c"] else "D")
            for k, r in runners.items()
            if r["mode"] == "verify"
        ]
        for label, style in (*verify, ("ar", "*"), ("optimum", "^"), ("pytorch", "v")):
            if label in runners and value[label] is not None and speed[label] is not None:
                ax.plot(
                    [speed[label]], [value[label]], style, markersize=10 if style == "*" else 8, label=label
                )
        ax.axvline(1.0, color="0.5", linewidth=0.8, linestyle="--")
        ax.set_xlabel("wall-clock speed-up vs ar")
        ax.set_ylabel(f"{METRIC_NAMES[metric]} ({set_name} prompts)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"DynaMo quality vs speed-up (Fig. 3 analogue) — {Path(result['environment']['artifact']).name}"
    )
    return _save(fig, plt, path)


def plot_emission_shares(result: dict, path: str | os.PathLike) -> Path:
    """The paper's Fig. 5: the share of dynamic passes emitting 1, 2, ... tokens, against eps_b."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runners = result["runners"]
    dynamic = _dynamic_sweep(runners)
    eps = [runners[k]["eps_b"] for k in dynamic]
    counts = sorted({int(n) for k in dynamic for n in runners[k]["latency"]["emission_share"]})
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in counts:
        shares = [runners[k]["latency"]["emission_share"].get(str(n), 0.0) for k in dynamic]
        ax.plot(eps, shares, "o-", label=f"{n} token{'s' if n > 1 else ''} per pass")
    ax.set_xlabel("eps_b (back-off: higher = more cautious)")
    ax.set_ylabel("share of passes")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Emissions per pass (Fig. 5) — {Path(result['environment']['artifact']).name}")
    return _save(fig, plt, path)


def _dynamic_sweep(runners: dict) -> list[str]:
    """The dynamic runners of the eps_b sweep (not the ablation's variants), by eps_b."""
    return sorted(
        (k for k, r in runners.items() if r["mode"] == "dynamic" and not ablation.is_ablation(k)),
        key=lambda k: runners[k]["eps_b"],
    )


def _save(fig, plt, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=120)
    finally:
        plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, png.getvalue())
    return path
