"""`dynamo-bench --compare A.json B.json ...`: runs from several devices (or settings) side by side.

Each file is a result `dynamo-bench --json` wrote. The report has one column per
run, named after its file (the stem; a number is added where two stems are
equal), and one table per figure with one row per runner; a runner a run lacks
shows "–". The first table describes each run's device and settings, so every
number below it can be traced to the machine that produced it. Only what the
results hold is printed: nothing is recomputed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from dynamo_bench.benchmark import SCHEMA
from dynamo_bench.errors import BenchError
from dynamo_bench.report import _f, _table, device_line

__all__ = ["compare_markdown", "load_results"]


def load_results(paths: Sequence[str | os.PathLike]) -> list[tuple[str, dict]]:
    """(column label, result) per file; BenchError naming every file that is not a dynamo-bench result."""
    if len(paths) < 2:
        raise BenchError(
            "--compare needs at least two result files (dynamo-bench --json FILE on each device)"
        )
    problems, loaded = [], []
    for path in map(Path, paths):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        if not isinstance(result, dict) or result.get("schema") != SCHEMA or "runners" not in result:
            problems.append(f"{path}: not a dynamo-bench result (schema {SCHEMA!r})")
            continue
        loaded.append((path, result))
    if problems:
        raise BenchError(
            "cannot compare: " + "; ".join(problems) + ": pass files written by dynamo-bench --json"
        )
    labels: list[str] = []
    for path, _ in loaded:
        label, n = path.stem, 2
        while label in labels:
            label, n = f"{path.stem} ({n})", n + 1
        labels.append(label)
    return [(label, result) for label, (_, result) in zip(labels, loaded, strict=True)]


def _settings(result: dict) -> str:
    s = result.get("settings", {})
    counts = sum(s.get("prompt_counts", {}).values())
    return (
        f"{counts} prompts × {len(s.get('seeds', []))} seeds × {s.get('max_new_tokens')} tokens, "
        f"{s.get('repeats')} rounds"
    )


def _provider(env: dict) -> str:
    threads = env["threads"] if env["threads"] is not None else "ORT's default threads"
    return f"{env['provider']}, {threads}"


def _header_table(runs: list[tuple[str, dict]]) -> str:
    rows = [
        ["device", *[device_line(r["environment"]) for _, r in runs]],
        ["provider, threads", *[_provider(r["environment"]) for _, r in runs]],
        ["artifact", *[str(r["environment"]["artifact"]) for _, r in runs]],
        ["manifest sha256", *[str(r["environment"]["manifest_sha256"])[:12] for _, r in runs]],
        ["settings", *[_settings(r) for _, r in runs]],
        ["judge", *[str(r.get("settings", {}).get("judge")) for _, r in runs]],
        ["commit", *[str(r["environment"].get("git_commit")) for _, r in runs]],
        [
            "skipped",
            *[", ".join(dict.fromkeys(s["part"] for s in r.get("skipped", []))) or "–" for _, r in runs],
        ],
    ]
    return _table(["", *[label for label, _ in runs]], rows)


def _runner_labels(runs: list[tuple[str, dict]]) -> list[str]:
    """Every runner of any run, in the order they first appear."""
    return list(dict.fromkeys(label for _, r in runs for label in r["runners"]))


def _figure_table(runs: list[tuple[str, dict]], cell: Callable[[dict, str], str]) -> str:
    rows = []
    for runner in _runner_labels(runs):
        rows.append([runner, *[cell(r, runner) if runner in r["runners"] else "–" for _, r in runs]])
    return _table(["runner", *[label for label, _ in runs]], rows)


def _latency(key: str, stat: str | None = None, digits: int = 2, scale: float = 1.0):
    """A latency figure; `stat` picks "median"/"best" from a figure measured per round."""

    def cell(result: dict, runner: str) -> str:
        value = result["runners"][runner]["latency"].get(key)
        if stat is not None and isinstance(value, dict):
            value = value.get(stat)
        return _f(None if value is None else scale * value, digits)

    return cell


def _percentiles(key: str):
    def cell(result: dict, runner: str) -> str:
        row = result["runners"][runner]["latency"].get("per_call", {}).get(key)
        if not row or row.get("p50") is None:
            return "–"
        return f"{_f(row['p50'])} / {_f(row['p90'])}"

    return cell


def _speedup(result: dict, runner: str) -> str:
    return _f(result.get("speedups", {}).get(runner, {}).get("vs_ar"), 2, "×")


def _judged_ppl(result: dict, runner: str) -> str:
    quality = result["runners"][runner].get("quality", {})
    return _f(quality.get("by_set", {}).get("all", {}).get("judged_ppl"))


FIGURES = (
    ("tokens/s (median over rounds)", _latency("tokens_per_s", "median", 1)),
    ("wall-clock speed-up vs ar (same run)", _speedup),
    ("tokens per forward pass", _latency("tokens_per_pass")),
    ("time to first token, ms (p50 / p90 over calls)", _percentiles("ttft_ms")),
    ("decode ms per pass (p50 / p90 over calls)", _percentiles("decode_ms_per_pass")),
    ("decode ms per token (p50 / p90 over calls)", _percentiles("decode_ms_per_token")),
    ("sampling share of decode time, %", _latency("sampling_share", "median", 0, 100.0)),
    ("peak RSS, MB", _latency("peak_rss_mb", None, 0)),
    ("judged perplexity (each run's own judge)", _judged_ppl),
)


def compare_markdown(runs: list[tuple[str, dict]]) -> str:
    parts = [
        "# dynamo-bench --compare",
        "",
        _header_table(runs),
        "",
        "Speed-ups divide by `ar` of the same run; judged perplexities are comparable only between runs with "
        "the same judge and prompts.",
    ]
    for title, cell in FIGURES:
        parts += ["", f"## {title}", "", _figure_table(runs, cell)]
    return "\n".join(parts) + "\n"
