"""Atomic outputs: a file or directory appears whole, or not at all.

Everything the project writes (token files, tokenizers, checkpoints, the corpus,
co-occurrence directories, exported artifacts, evaluation and benchmark reports)
is built under a hidden temporary name beside its target, in the same directory
and so on the same filesystem, and then renamed into place with `os.replace`,
which POSIX makes atomic. A crash, a full disk or Ctrl-C midway therefore never
leaves a half-written output under the real name for a later run to trust:
readers see the old version or the new one. On any failure the temporary is
removed and the exception propagates. This module is the only place that renames
an output into place; it lives in the torch-free runtime so that both sides of
the project (runtime/, dynamo_export/, converters/) share it.

Temporary names are unique (`tempfile`), so two writers never share one. A
process killed outright (SIGKILL, power loss) can leave a hidden
`.NAME.tmp-*` sibling behind; it is never mistaken for the output.

The results get ordinary permissions (files 0644, directories 0755), not the
private 0600/0700 that `tempfile` creates, like any other file the tools write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FILE_MODE = 0o644
DIRECTORY_MODE = 0o755


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` (creating its parent), replacing any old file only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """`atomic_write_text` for JSON, indented by 2 and ending in a newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; on success rename it to `target`.

    An exception inside the block removes the temporary directory and leaves
    `target` as it was. An existing `target` raises FileExistsError unless
    `overwrite`; callers that own a typed error (and a stricter rule about what
    they may replace) should check first, before any expensive work. With
    `overwrite`, `install_directory` swaps the directories. A `target` that is a
    file or a symlink is never replaced (NotADirectoryError).
    """
    target = Path(target)
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        staging.chmod(DIRECTORY_MODE)
        yield staging
        install_directory(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def install_directory(staging: str | os.PathLike, target: str | os.PathLike, overwrite: bool = False) -> None:
    """Rename the finished directory `staging` (on `target`'s filesystem) to `target`.

    An old `target` (allowed only with `overwrite`) is moved aside first, the new
    one renamed in and only then the old one deleted; if the rename fails, the
    old directory is put back. `staging` is left to the caller on failure.
    """
    staging, target = Path(staging), Path(target)
    _check_target(target, overwrite)  # again: it may have appeared while the caller built `staging`
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    try:
        os.replace(target, old)  # a directory may replace an empty directory on POSIX
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_target(target: Path, overwrite: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists; refusing to replace it without overwrite")
    if target.is_symlink() or not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; refusing to replace it")
