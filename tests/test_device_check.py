"""scripts/device_check.sh, the GPU check, run on CPU (--provider cpu): the same path a GPU machine runs,
from the exports to the side-by-side bench tables, on the tiny model (--quick)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"


@pytest.mark.slow
def test_device_check_dry_run_on_cpu(tiny_dynamo_dir, tiny_cooccurrence_dir, tmp_path):
    model = tmp_path / "model"  # laid out as artifacts/reference-t3: the checkpoint with its masks inside
    shutil.copytree(tiny_dynamo_dir, model)
    shutil.copytree(tiny_cooccurrence_dir, model / "cooccurrence")
    out = tmp_path / "out"
    args = [
        "--provider",
        "cpu",
        "--quick",
        "--model",
        str(model),
        "--out",
        str(out),
        "--python",
        sys.executable,
    ]
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for dtype in ("fp32", "fp16"):
        manifest = json.loads((out / dtype / "manifest.json").read_text())
        assert manifest["graph"]["dtype"] == dtype
    check = json.loads((out / "providers.json").read_text())
    assert check["passed"] and check["provider"] == "cpu"
    assert [p["name"] for p in check["parity"]] == [
        "fp32 on cpu vs fp32 on cpu",
        "fp16 on cpu vs fp32 on cpu",
    ]
    assert all(b["equal"] == b["generations"] for b in check["io_binding"])
    for name in ("bench-cpu-fp32", "bench-cpu-fp16"):
        bench = json.loads((out / f"{name}.json").read_text())
        assert {"ar", "verify"} <= set(bench["runners"]) and any(
            k.startswith("dynamic") for k in bench["runners"]
        )
    compare = (out / "compare.md").read_text()
    assert "| bench-cpu-fp32 | bench-cpu-fp16 |" in compare
    assert compare in done.stdout  # printed as well as written
    assert "device_check: all checks passed" in done.stdout


def test_device_check_rejects_unknown_options(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--provider", "tpu"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "device_check: error: --provider must be cuda or cpu, got 'tpu'"
    done = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown option --frobnicate" in done.stderr
