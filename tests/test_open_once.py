"""Open once: a load reads every file of an artifact once, from one directory, and uses those bytes.

Two valid artifacts, A and B, differ in every part a load hands on: a marker in the manifest's
producer, the same marker in the graph's metadata (ONNX Runtime reports it back), and the masks'
min_count. A load is consistent when all three name the same artifact. The swaps are made the
way `dynamo-export --force` makes them (runtime/atomic.py: os.replace of whole directories).
Before runtime/artifact_files.py the loader opened files by path again after checking them, and
both tests below loaded a mix: the masks or the graph of B under A's manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

import runtime.engine
from runtime import DynaMoRuntime
from runtime.cooccurrence import CooccurrenceMask
from runtime.errors import ArtifactFileError
from runtime.manifest import MANIFEST_NAME, inventory, read_manifest

MARKER = "open_once_marker"


def _make_variant(source: Path, target: Path, marker: str, min_count_step: int) -> None:
    """A copy of `source` whose manifest, graph and masks all say `marker`, rehashed (a valid artifact)."""
    shutil.copytree(source, target)
    model = onnx.load(str(target / "model.onnx"), load_external_data=False)
    onnx.helper.set_model_props(model, {MARKER: marker})
    (target / "model.onnx").write_bytes(model.SerializeToString())
    meta_path = target / "cooccurrence" / "cooccurrence.json"
    meta = json.loads(meta_path.read_text())
    meta["min_count"] += min_count_step
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    manifest = read_manifest(target)
    fresh = dataclasses.replace(
        manifest, producer={**manifest.producer, MARKER: marker}, files=inventory(target)
    )
    (target / MANIFEST_NAME).write_text(fresh.to_json())


@pytest.fixture(scope="module")
def variants(tiny_artifact, tmp_path_factory) -> dict[str, Path]:
    """Artifacts A and B (pristine sources; tests copy them) and the min_count of A's masks."""
    base = tmp_path_factory.mktemp("open-once")
    out = {"A": base / "A", "B": base / "B"}
    _make_variant(tiny_artifact.out, out["A"], "A", 0)
    _make_variant(tiny_artifact.out, out["B"], "B", 1)
    return out


def _which(rt: DynaMoRuntime, a_min_count: int) -> tuple[str, str, str]:
    """(manifest, graph as ONNX Runtime loaded it, masks): the artifact each part came from."""
    graph = rt.session.session.get_modelmeta().custom_metadata_map.get(MARKER)
    masks = "A" if rt.masks.meta.min_count == a_min_count else "B"
    return rt.manifest.producer[MARKER], graph, masks


def _swap(target: Path, other: Path, parking: Path) -> None:
    """Exchange the directories `target` and `other` with three renames (target briefly absent)."""
    os.replace(target, parking)
    os.replace(other, target)
    os.replace(parking, other)


@pytest.mark.parametrize("hook", ["masks", "graph check"])
def test_a_swap_between_check_and_use_cannot_mix_artifacts(variants, tmp_path, monkeypatch, hook):
    """The directory is swapped for B once, right after the masks are loaded or the graph checked:
    every part the load hands on must still be A's (the pinned directory's), none of them B's."""
    target, other, parking = tmp_path / "art", tmp_path / "other", tmp_path / "parking"
    shutil.copytree(variants["A"], target)
    shutil.copytree(variants["B"], other)
    a_min = json.loads((variants["A"] / "cooccurrence" / "cooccurrence.json").read_text())["min_count"]
    swapped = []

    def once():
        if not swapped:
            _swap(target, other, parking)
            swapped.append(True)

    if hook == "masks":
        real_load = CooccurrenceMask.load.__func__

        def load_then_swap(cls, *args, **kwargs):
            once()  # before the masks are read: the old loader read them from B's directory
            return real_load(cls, *args, **kwargs)

        monkeypatch.setattr(CooccurrenceMask, "load", classmethod(load_then_swap))
    else:
        real_check = runtime.engine.check_graph

        def check_then_swap(*args, **kwargs):
            info = real_check(*args, **kwargs)
            once()  # after the check: the old loader then gave ONNX Runtime B's graph
            return info

        monkeypatch.setattr(runtime.engine, "check_graph", check_then_swap)
    rt = DynaMoRuntime.load(target)
    assert swapped, "the hook never ran: the test no longer swaps between check and use"
    assert _which(rt, a_min) == ("A", "A", "A")
    assert rt.generate([1, 2, 3], max_new_tokens=4, seed=0).token_ids  # and the mix-free runtime runs


# The writer: another process installing A and B in turn over one path, as `dynamo-export --force`
# does it (runtime/atomic.py: build beside it, move the old aside, rename the new in, delete the old).
WRITER = """
import shutil, sys, time
from pathlib import Path
from runtime.atomic import install_directory
a, b, target, stop = map(Path, sys.argv[1:5])
n, deadline = 0, time.monotonic() + 60
while not stop.exists() and time.monotonic() < deadline:
    staging = target.parent / f".{target.name}.tmp-{n}"
    shutil.copytree(b if n % 2 == 0 else a, staging)
    install_directory(staging, target, overwrite=True)
    n += 1
    (target.parent / "installs").write_text(str(n))
    time.sleep(0.05)  # a real export takes seconds; this one re-installs many times per load
"""


def test_loads_during_repeated_force_installs_are_each_one_artifact(variants, tmp_path):
    """Every load that runs while another process keeps re-installing the artifact must succeed
    and hold one artifact's manifest, graph and masks (the old loader mixed them, or failed a hash)."""
    target, stop, count = tmp_path / "art", tmp_path / "stop", tmp_path / "installs"
    shutil.copytree(variants["A"], target)
    a_min = json.loads((variants["A"] / "cooccurrence" / "cooccurrence.json").read_text())["min_count"]
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(variants["A"]), str(variants["B"]), str(target), str(stop)],
        cwd=Path(__file__).resolve().parents[1],
    )
    seen = []
    try:
        deadline = time.monotonic() + 30
        while not count.exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer is running
        for _ in range(12):
            rt = DynaMoRuntime.load(target)
            parts = _which(rt, a_min)
            assert len(set(parts)) == 1, f"a load mixed artifacts: manifest, graph, masks from {parts}"
            seen.append(parts[0])
    finally:
        stop.touch()
        writer.wait(timeout=60)
    assert writer.returncode == 0
    installs = int(count.read_text()) if count.exists() else 0
    assert installs >= 2, f"the writer installed {installs} times during the loads: the test proved nothing"


def test_a_file_that_vanishes_in_a_directory_that_stays_is_an_error_not_a_retry(variants, tmp_path):
    """Retries are only for a replaced directory: a file missing from the one directory the path
    still names is the artifact's own fault, reported at once."""
    target = tmp_path / "art"
    shutil.copytree(variants["A"], target)
    (target / "cooccurrence" / "pairs.npz").unlink()
    with pytest.raises(ArtifactFileError, match=r"missing: \['cooccurrence/pairs.npz'\]"):
        DynaMoRuntime.load(target)
