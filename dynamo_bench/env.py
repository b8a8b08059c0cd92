"""The environment record: what a reader needs to know to trust (or reproduce) a benchmark's numbers.

It describes the device as well as the software, since runs from several devices are read side
by side (`dynamo-bench --compare`): the CPU's name, cores and memory, the board's model where
the firmware names it (single-board computers, phones), the GPU where the run used CUDA, and
ONNX Runtime's version and the execution providers this build offers. Torch-free.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import onnxruntime as ort
import psutil

from runtime.manifest import MANIFEST_NAME, sha256_of

# /proc/cpuinfo keys that name the CPU, best first: x86 ("model name"), older ARM ("Processor"),
# MIPS ("cpu model"), ARM boards that name only the SoC ("Hardware"), RISC-V ("uarch").
CPUINFO_NAME_KEYS = ("model name", "Processor", "cpu model", "Hardware", "uarch")
DEVICE_TREE_MODEL = (Path("/proc/device-tree/model"), Path("/sys/firmware/devicetree/base/model"))


def cpu_model_from_cpuinfo(text: str) -> str | None:
    """The CPU's name from /proc/cpuinfo's text (the first key of CPUINFO_NAME_KEYS present), else None."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            values.setdefault(key.strip(), value.strip())
    return next((values[k] for k in CPUINFO_NAME_KEYS if k in values), None)


def cpu_model() -> str:
    """The CPU's marketing name; platform.processor() is often empty on Linux, /proc/cpuinfo is not."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        name = cpu_model_from_cpuinfo(cpuinfo.read_text(errors="replace"))
        if name:
            return name
    if platform.system() == "Darwin":
        name = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if name:
            return name
    return platform.processor() or platform.machine()


def device_model() -> str | None:
    """The board's or phone's model as its firmware names it (e.g. 'Raspberry Pi 5 Model B'), else None."""
    for path in DEVICE_TREE_MODEL:
        try:
            return path.read_bytes().rstrip(b"\0").decode(errors="replace").strip() or None
        except OSError:
            continue
    return None


def _run(command: list[str]) -> str | None:
    """A command's stripped stdout, or None when it is missing or fails (the record is best effort)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def gpus() -> list[dict] | None:
    """Name, memory and driver of each NVIDIA GPU (nvidia-smi), or None where there is none to ask."""
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    if not out:
        return None
    rows = []
    for line in out.splitlines():
        name, memory, driver = ([part.strip() for part in line.split(",")] + ["", "", ""])[:3]
        rows.append({"name": name, "memory": memory, "driver": driver})
    return rows


def onnxruntime_record() -> dict:
    """The onnxruntime module actually imported: version (also for onnxruntime-gpu), build device, providers."""
    return {
        "version": ort.__version__,
        "device": ort.get_device(),
        "available_providers": list(ort.get_available_providers()),
    }


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
    """Device (CPU, cores, memory, board, GPU on CUDA), threads, provider, ONNX Runtime and library
    versions, the artifact's manifest sha256 and the git commit."""
    manifest = Path(artifact) / MANIFEST_NAME if artifact is not None else None
    return {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "device_model": device_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(logical=True),
        "threads": threads,
        "provider": provider,
        "memory_total_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in (
                "onnxruntime",
                "onnxruntime-gpu",
                "numpy",
                "torch",
                "transformers",
                "optimum-onnx",
                "tokenizers",
            )
        },
        "onnxruntime": onnxruntime_record(),
        "gpus": gpus() if provider == "cuda" else None,
        "artifact": str(artifact) if artifact is not None else None,
        "manifest_sha256": sha256_of(manifest) if manifest is not None and manifest.is_file() else None,
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }
