"""The newcomer's journey (issue 20): README.md's pipeline, run command by command as the README writes it.

The commands are read from README.md between the `newcomer-pipeline` markers, so a README that
drifts from the code (a renamed option, a missing step, a path one step writes and the next does
not read) fails here. Only the sizes change: the reference model's (8k vocabulary, 6 x 256
layers, 1,200 steps) become tiny ones through SIZES, on a small corpus generated from Python's
own sources. Each step's outputs must exist, and the last generation must print text.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import _python_sources_text

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- newcomer-pipeline:begin -->", "<!-- newcomer-pipeline:end -->"
PIPELINE = [
    "dynamo-data split",
    "dynamo-data train-tokenizer",
    "dynamo-data tokenize",
    "dynamo-data tokenize",
    "dynamo-train",
    "dynamo-train",
    "dynamo-cooccur",
    "dynamo-eval",
    "dynamo-export",
    "dynamo-generate",
    "dynamo-bench",
]
# the reference sizes -> tiny ones; an option the README does not use is not added
SIZES = {
    "--vocab-size": "300",
    "--layers": "2",
    "--hidden": "32",
    "--heads": "2",
    "--context": "128",
    "--seq-len": "32",
    "--batch-size": "4",
    "--steps": "4",
}
EXTRA = {
    "dynamo-generate": ["--max-new-tokens", "16", "--seed", "0"],
    "dynamo-bench": ["--max-new-tokens", "16"],
}


def readme_commands(text: str) -> list[list[str]]:
    """The commands of the pipeline block: comments dropped, continuation lines joined."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise AssertionError(f"README.md must hold the pipeline between {BEGIN} and {END} exactly once")
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    code = re.search(r"```bash\n(.*?)```", block, re.S)
    assert code, "the pipeline markers must enclose a ```bash block"
    joined = re.sub(r"\\\n\s*", " ", code.group(1))
    return [
        shlex.split(line)
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def tiny(argv: list[str]) -> list[str]:
    out = [SIZES.get(argv[i - 1], arg) if i and argv[i - 1] in SIZES else arg for i, arg in enumerate(argv)]
    return out + EXTRA.get(argv[0], [])


def outputs(argv: list[str]) -> list[str]:
    """What a command promises to write: its --out / --json (a token file NAME is NAME.bin)."""
    found = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--out", "--json")]
    if argv[:2] == ["dynamo-data", "tokenize"]:
        found = [f"{name}.bin" for name in found]
    return found


def _corpus(root: Path) -> None:
    """~20 small documents of real English and code (Python's own sources), one per file."""
    text = _python_sources_text()
    pieces = [text[i : i + 6000] for i in range(0, len(text), 6000)][:24]
    for i, piece in enumerate(pieces):
        (root / "data" / "corpus" / f"doc{i:02d}.txt").write_text(piece)


def test_the_readme_describes_every_step_in_order():
    text = README.read_text()
    use = text[text.index("## Use") :]
    assert (
        "pip install ." in use and 'pip install ".[export]"' in use
    )  # runtime-only and full, from the checkout
    programs = [" ".join(argv[:2]) if argv[0] == "dynamo-data" else argv[0] for argv in readme_commands(text)]
    assert programs == PIPELINE


@pytest.mark.slow
def test_the_readme_pipeline_runs_end_to_end(tmp_path):
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    _corpus(tmp_path)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    timings, generated = [], ""
    for argv in readme_commands(README.read_text()):
        run = tiny(argv)
        began = time.perf_counter()
        proc = subprocess.run(
            [str(bin_dir / run[0]), *run[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        timings.append(f"{' '.join(argv[:2])}: {time.perf_counter() - began:.1f}s")
        if run[0] == "dynamo-generate":
            generated = proc.stdout
        assert proc.returncode == 0, (
            f"{shlex.join(run)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
        for path in outputs(run):
            assert (tmp_path / path).exists(), f"{shlex.join(run)} did not write {path}"
    print("; ".join(timings))
    assert (tmp_path / "out" / "base" / "final-gpt-neox" / "tokenizer.json").is_file()  # what step 6 converts
    assert (tmp_path / "out" / "t3" / "loss.png").is_file()
    assert generated.strip(), "dynamo-generate printed no text"
