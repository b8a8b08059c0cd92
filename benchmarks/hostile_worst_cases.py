"""The hostile-input tests, class by class, with the time and memory of each class's worst case.

Issue 19's classes of hostile artifacts and inputs each have tests (which assert the typed
error); this runs them under benchmarks/pytest_peak.py and prints, per class, how many tests
passed, the slowest test (call phase, fixtures excluded) and the one whose peak resident
memory rose most above its start, as a markdown table. A class whose worst case allocates
more than --max-rise-mb or runs longer than --max-seconds is flagged.

    python -m benchmarks.hostile_worst_cases [--json out/hostile.json] [--max-rise-mb 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from runtime.atomic import atomic_write_json

CLASSES = {  # class -> pytest node ids (files, or file::test prefixes)
    "tokenizer.json as untrusted input": [
        "tests/test_tokenizer_policy.py",
        "tests/test_fuzz_loaders.py::test_fuzz_tokenizer_json_through_the_policy_and_tokenizers",
        "tests/test_fuzz_loaders.py::test_fuzz_tokenizer_bytes",
    ],
    "graphs that lie about their outputs": [
        "tests/test_graph_contract.py",
        "tests/test_fuzz_loaders.py::test_fuzz_graph_outputs_that_lie",
    ],
    "open once (swaps between check and use)": ["tests/test_open_once.py"],
    "bounds on options, prompts, masks, walks": ["tests/test_bounds.py"],
    "signed artifacts": ["tests/test_signing.py"],
    "manifest, masks and graphs, fuzzed": [
        "tests/test_fuzz_loaders.py::test_fuzz_manifest_through_the_whole_loader",
        "tests/test_fuzz_loaders.py::test_fuzz_mask_files_in_memory",
        "tests/test_fuzz_loaders.py::test_fuzz_graph_through_the_whole_loader",
    ],
    "artifact files (paths, sizes, hashes, pickles)": ["tests/test_security.py"],
}


def run_tests(json_path: Path) -> dict:
    nodes = [node for nodes in CLASSES.values() for node in nodes]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "benchmarks.pytest_peak",
        "--peak-json",
        str(json_path),
    ]
    subprocess.run([*command, *nodes], check=False)
    return json.loads(json_path.read_text())


def summarise(records: dict) -> dict:
    """{class: {tests, passed, slowest: (id, s), largest: (id, rise MB, peak MB)}}."""
    summary = {}
    for name, nodes in CLASSES.items():
        mine = {k: v for k, v in records.items() if any(k.startswith(node) for node in nodes)}
        if not mine:
            summary[name] = {"tests": 0}
            continue
        slowest = max(mine, key=lambda k: mine[k]["seconds"])
        largest = max(mine, key=lambda k: mine[k]["rise_mb"])
        summary[name] = {
            "tests": len(mine),
            "passed": sum(v["passed"] for v in mine.values()),
            "slowest": (slowest, mine[slowest]["seconds"]),
            "largest": (largest, mine[largest]["rise_mb"], mine[largest]["peak_mb"]),
        }
    return summary


def markdown(summary: dict, children_peak_mb: float, max_rise_mb: float, max_seconds: float) -> str:
    rows = [
        "| class | tests passed | slowest test (call phase) | s | largest memory rise | MB rise / peak |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        if not s["tests"]:
            rows.append(f"| {name} | no tests found | | | | |")
            continue
        (slow_id, seconds), (big_id, rise, peak) = s["slowest"], s["largest"]
        flag = " **over bound**" if rise > max_rise_mb or seconds > max_seconds else ""
        rows.append(
            f"| {name}{flag} | {s['passed']}/{s['tests']} | `{slow_id.split('::', 1)[1]}` | {seconds:.2f} "
            f"| `{big_id.split('::', 1)[1]}` | {rise:.0f} / {peak:.0f} |"
        )
    rows.append(
        f"\nLargest child process of the run (tests that spawn one): {children_peak_mb:.0f} MB peak RSS."
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="also write the per-test records and the summary here")
    parser.add_argument(
        "--max-rise-mb", type=float, default=1024.0, help="flag a class above this (default: 1 GiB)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="flag a class above this (default: 60)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_tests(Path(tmp) / "peak.json")
    summary = summarise(result["tests"])
    print(markdown(summary, result["children_peak_mb"], args.max_rise_mb, args.max_seconds))
    if args.json:
        atomic_write_json(args.json, {"summary": summary, **result})


if __name__ == "__main__":
    main()
