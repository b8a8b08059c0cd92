"""Atomic writes: a failure at any point leaves the old artifact intact and no temporaries behind."""

from __future__ import annotations

import json
import os
import stat

import pytest

from runtime.atomic import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    install_directory,
)


def _fail_when_source(monkeypatch, predicate):
    """Make os.replace raise for sources matching `predicate`; other renames (the restore) still work."""
    real_replace = os.replace

    def replace(src, dst):
        if predicate(os.fspath(src)):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_round_trip_with_ordinary_permissions(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.json"
    assert atomic_write_json(target, {"a": [1, 2]}) == target
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    atomic_write_text(target, "héllo\n")
    assert target.read_bytes() == "héllo\n".encode()
    assert _mode(target) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_rename_keeps_the_old_file_and_no_temporaries(tmp_path, monkeypatch):
    target = tmp_path / "ids.bin"
    atomic_write_bytes(target, b"old")
    _fail_when_source(monkeypatch, lambda src: True)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ids.bin"]


def test_failure_while_writing_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_json(target, {"old": 1})
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(target, {"new": object()})
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "text, not bytes")  # fails inside the write, after the temp file exists
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_directory_appears_whole_with_ordinary_permissions(tmp_path):
    target = tmp_path / "parent" / "ckpt"
    with atomic_directory(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".ckpt.tmp-")
        (staging / "weights").write_bytes(b"w")
        assert not target.exists()
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert _mode(target) == 0o755
    assert [p.name for p in target.parent.iterdir()] == ["ckpt"]


def test_directory_refuses_an_existing_target_unless_overwrite(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"), atomic_directory(target):
        pytest.fail("the block must not run")
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(NotADirectoryError, match="not a directory"),
        atomic_directory(tmp_path / "file", True),
    ):
        pytest.fail("the block must not run")
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "file"]


def test_exception_inside_the_block_keeps_the_old_directory(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target, overwrite=True) as staging:
        (staging / "half").write_bytes(b"h")
        raise KeyboardInterrupt
    assert [p.name for p in target.iterdir()] == ["keep"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_rename_restores_the_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep").write_text("old")
    _fail_when_source(monkeypatch, lambda src: os.path.basename(src).startswith(".ckpt.tmp-"))
    with pytest.raises(OSError, match="disk full"), atomic_directory(target, overwrite=True) as staging:
        (staging / "new").write_text("new")
    assert (target / "keep").read_text() == "old"
    assert [p.name for p in target.iterdir()] == ["keep"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # neither staging nor the moved-aside copy


def test_install_directory_moves_a_finished_directory_in_and_the_old_one_out(tmp_path):
    """The rename that exporters with their own staging layout call (converters/artifact.py)."""
    target, built = tmp_path / "art", tmp_path / "staging" / "built"
    built.mkdir(parents=True)
    (built / "new").write_text("new")
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(FileExistsError):
        install_directory(built, target)
    install_directory(built, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "staging"]  # the old one is gone
