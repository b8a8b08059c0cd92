"""A pytest plugin: the wall-clock time and peak memory of each test's call phase, as JSON.

    pytest -p benchmarks.pytest_peak --peak-json OUT.json tests/...

Before a test's call phase (fixtures are already set up, so a module's shared artifact is not
charged to its first test) the process's peak resident set size is reset (Linux: writing 5 to
/proc/self/clear_refs resets VmHWM); after it, VmHWM is the largest RSS the test reached.
`rise_mb` is that peak minus the RSS at the start: what the test itself allocated at most.
Memory of child processes a test starts is not in VmHWM; `children_peak_mb` (getrusage) is the
largest child of the whole run. Used by benchmarks/hostile_worst_cases.py.
"""

from __future__ import annotations

import json
import re
import resource
import time
from pathlib import Path

import pytest

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE).group(1))


def pytest_addoption(parser) -> None:
    parser.addoption("--peak-json", help="write each test's call-phase time and peak RSS here")


def pytest_configure(config) -> None:
    if config.getoption("--peak-json") and not CLEAR_REFS.exists():
        raise pytest.UsageError("--peak-json needs Linux's /proc/self/clear_refs to reset the peak RSS")
    config._peak_records = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    records = item.config._peak_records
    if not item.config.getoption("--peak-json"):
        yield
        return
    CLEAR_REFS.write_text("5")
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    outcome = yield
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    records[item.nodeid] = {
        "seconds": seconds,
        "rss_before_mb": before / 1024,
        "peak_mb": peak / 1024,
        "rise_mb": max(0, peak - before) / 1024,
        "passed": outcome.excinfo is None,
    }


def pytest_sessionfinish(session) -> None:
    path = session.config.getoption("--peak-json")
    if path:
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        Path(path).write_text(
            json.dumps({"tests": session.config._peak_records, "children_peak_mb": children}, indent=1)
        )
