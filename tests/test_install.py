"""The runtime-only install, for real: a fresh virtual environment with `pip install .` and no extras.

One venv per test session (module scope: only this module uses it). pip fetches numpy, scipy,
onnxruntime, tokenizers, psutil and tqdm from the package index (its cache makes a rerun quick) and
builds the project from a copy of its sources, so nothing here depends on the development install.
In it: `dynamo-bench --artifact` runs and writes its JSON, saying what it skipped; every command
that needs the export extra exits non-zero with one line naming it, `--help` included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPORT_INSTALL = 'pip install "dynamo-export[export]"'
# What a wheel needs: pyproject.toml's packages.find include list, the readme, the build config.
SOURCES = ("pyproject.toml", "README.md", "runtime", "converters", "dynamo_export", "dynamo_bench")
NEEDS_EXPORT = ("dynamo-export", "dynamo-train", "dynamo-eval", "dynamo-data")
PIP_TIMEOUT_S = 900

pytestmark = pytest.mark.slow


def _clean_env() -> dict[str, str]:
    """The environment minus anything that would let the venv see the development install."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory) -> Path:
    """A fresh venv holding `pip install <copy of this checkout>`; returns its bin directory."""
    root = tmp_path_factory.mktemp("runtime-only")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(
                path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
            )
        else:
            shutil.copy2(path, source / name)
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    bin_dir = root / "venv" / "bin"
    done = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", str(source)],
        capture_output=True,
        text=True,
        cwd=root,
        env=_clean_env(),
        timeout=PIP_TIMEOUT_S,
    )
    assert done.returncode == 0, (
        f"pip install . failed (needs the package index):\n{done.stdout}\n{done.stderr}"
    )
    return bin_dir


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_clean_env(),
        timeout=600,
    )


def test_the_install_has_no_torch(runtime_only, tmp_path):
    code = "import importlib.util as u; print([m for m in ('torch', 'transformers', 'onnx', 'optimum') if u.find_spec(m)])"
    done = _run(runtime_only, "python", "-c", code, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("command", NEEDS_EXPORT)
def test_commands_that_need_the_export_extra_say_so_in_one_line(runtime_only, tmp_path, command):
    for args in (("--help",), ()):
        done = _run(runtime_only, command, *args, cwd=tmp_path)
        assert done.returncode != 0, (command, args)
        assert "Traceback" not in done.stderr and done.stdout == ""
        (line,) = done.stderr.splitlines()
        assert line.startswith(f'{command}: error: needs the "export" extra (missing: torch')
        assert line.endswith(EXPORT_INSTALL)


def test_runtime_commands_run(runtime_only, tmp_path):
    for command in ("dynamo-generate", "dynamo-bench", "dynamo-cooccur"):
        done = _run(runtime_only, command, "--help", cwd=tmp_path)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
    spark = ("--engine", "spark", "--tokens", "t", "--out", "o")
    done = _run(runtime_only, "dynamo-cooccur", *spark, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.endswith('pip install "dynamo-export[spark]"'), line
    done = _run(runtime_only, "dynamo-bench", "--scale", "--no-progress", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("dynamo-bench: error: --scale exports models and needs torch")


def test_bench_runs_from_the_runtime_only_install(runtime_only, bpe_models, tmp_path):
    args = ["--artifact", str(bpe_models / "t3-onnx"), "--baseline", str(bpe_models / "base")]
    args += ["--max-new-tokens", "8", "--repeats", "1", "--warmup", "0", "--seeds", "0", "--eps-b", "0.5"]
    args += ["--threads", "1", "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "a.json")]
    done = _run(runtime_only, "dynamo-bench", *args, "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "a.json").read_text())
    assert {"ar", "dynamic eps_b=0.5", "verify"} <= set(result["runners"])
    assert "optimum" not in result["runners"] and "pytorch" not in result["runners"]
    assert result["environment"]["versions"]["torch"] is None
    assert {s["part"] for s in result["skipped"]} == {"plot", "optimum", "pytorch", "mauve", "self_bleu"}
    assert done.stderr.count("dynamo-bench: note: ") == len(result["skipped"])
    assert "Skipped on this install:" in done.stdout and "## Latency per call" in done.stdout
    for run in result["runners"].values():
        assert (
            run["latency"]["tokens_per_s"]["median"] > 0 and run["latency"]["per_call"]["ttft_ms"]["p90"] > 0
        )
    # A second device's result, side by side (here the same machine, fewer modes).
    args = ["--artifact", str(bpe_models / "t3-onnx"), "--modes", "ar", "--max-new-tokens", "8"]
    args += ["--repeats", "1", "--warmup", "0", "--seeds", "0", "--json", str(tmp_path / "b.json")]
    assert _run(runtime_only, "dynamo-bench", *args, "--no-progress", cwd=tmp_path).returncode == 0
    done = _run(
        runtime_only,
        "dynamo-bench",
        "--compare",
        str(tmp_path / "a.json"),
        str(tmp_path / "b.json"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "|  | a | b |" in done.stdout and "| verify |" in done.stdout


def test_the_install_is_a_wheel_of_this_checkout(runtime_only):
    """The launcher the console scripts point at is the copy's, not the checkout's."""
    done = subprocess.run(
        [str(runtime_only / "python"), "-c", "import runtime.launcher as m; print(m.__file__)"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=runtime_only,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(runtime_only.parent)
    assert sys.prefix not in done.stdout
