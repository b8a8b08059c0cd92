"""The environment record: what a reader needs to know to trust (or reproduce) a benchmark's numbers."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import psutil

from runtime.manifest import MANIFEST_NAME, sha256_of


def cpu_model() -> str:
    """The CPU's marketing name; platform.processor() is often empty on Linux, /proc/cpuinfo is not."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit(repo: str | os.PathLike = ".") -> str | None:
    """HEAD's commit, with '+dirty' when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_record(artifact: str | os.PathLike | None, provider: str, threads: int | None) -> dict:
    """CPU, cores, threads, provider, library versions, the artifact's manifest sha256 and the git commit."""
    manifest = Path(artifact) / MANIFEST_NAME if artifact is not None else None
    return {
        "cpu_model": cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(logical=True),
        "threads": threads,
        "provider": provider,
        "memory_total_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("onnxruntime", "numpy", "torch", "transformers", "optimum-onnx", "tokenizers")
        },
        "artifact": str(artifact) if artifact is not None else None,
        "manifest_sha256": sha256_of(manifest) if manifest is not None and manifest.is_file() else None,
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }
