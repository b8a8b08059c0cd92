"""Read an artifact once: every file's bytes through one pinned directory, checked, then handed on.

Why: the loader used to open the artifact's files by path several times (hashes, tokenizer,
masks, graph check, ONNX Runtime). A writer replacing the directory meanwhile, as
`dynamo-export --force` does (runtime/atomic.py: the old directory moved aside, the new one
renamed in, the old one deleted), made loads mix the files of two artifacts, and a graph
swapped in after its check reached ONNX Runtime unchecked. So `read_artifact`:

- opens the artifact directory once and opens every file relative to that descriptor, one
  path component at a time with O_NOFOLLOW: renaming the folder, or anything in it, cannot
  redirect a later open, and every file comes from the one directory that was pinned;
- reads each file once, whole, into memory, bounded by the manifest's size for it (the
  manifest by MAX_MANIFEST_BYTES, the signature by MAX_SIGNATURE_BYTES). The checks (size,
  sha256, signature, graph, tokenizer allow-list, mask headers) judge these bytes, and the
  same bytes go to ONNX Runtime (the model from bytes, its external data from memory), to
  `tokenizers` (`Tokenizer.from_str`) and to the mask reader (zip members from memory, never
  unpickled). No path is opened twice between a check and a use;
- when a read fails and the path no longer names the directory it pinned (a swap: the old
  directory's files vanish while it is deleted, or the path is briefly missing between the
  two renames), starts over from the path, a few times. A concurrent export therefore yields
  the old artifact or the new one, never a mix.

Cost: the files stay in memory until the session is built (ONNX Runtime copies the weights),
so a load peaks at about twice the artifact's size; the caller drops the bytes afterwards.
Needs POSIX `dir_fd` support (Linux, macOS).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ArtifactError, ArtifactFileError, ManifestError
from runtime.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    Manifest,
    parse_manifest,
)

MAX_SIGNATURE_BYTES = 1 << 20  # a key-mode signature bundle of a few files is a few kB
ATTEMPTS = 8  # reads of a directory that keeps being replaced; then the last error stands
# Doubled per attempt (0.25 s in all): a swap is two renames, a few ms apart at worst (measured on
# overlayfs); a thread of this process that renames holds the GIL, and wakes in step with us.
RETRY_PAUSE_S = 0.002

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO planted in the artifact must not wait for a writer.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CHUNK = 1 << 30


@dataclass(frozen=True)
class ArtifactFiles:
    """One artifact as read: its manifest and the bytes of every file it lists, all from one directory."""

    root: Path
    manifest: Manifest
    manifest_bytes: bytes
    files: dict[str, bytes]  # every path manifest.files lists -> its bytes, sizes (and hashes) checked
    signature: bytes | None  # SIGNATURE_NAME's bytes when a signature was asked for and verified

    def folder(self, rel: str) -> dict[str, bytes]:
        """The files directly inside `rel` (a folder of the artifact), by name."""
        prefix = rel.rstrip("/") + "/"
        return {
            path[len(prefix) :]: data
            for path, data in self.files.items()
            if path.startswith(prefix) and "/" not in path[len(prefix) :]
        }


def read_artifact(
    artifact_dir: str | os.PathLike,
    check_hashes: bool = True,
    verify_signature: str | os.PathLike | None = None,
) -> ArtifactFiles:
    """Read and check an artifact once (module docstring); ArtifactError (or a subclass) unless it
    holds exactly the files its manifest lists, with their sizes and, with `check_hashes`, sha256s.

    `verify_signature`, a public key's path, also requires SIGNATURE_NAME to be a valid
    signature by that key over these same bytes, the manifest's included (runtime/signing.py);
    it is checked before the manifest is parsed and before any file is handed on.
    """
    root = Path(artifact_dir).resolve()
    for attempt in range(ATTEMPTS):
        last = attempt == ATTEMPTS - 1
        try:
            fd = os.open(root, _DIR_FLAGS)
        except FileNotFoundError:
            if last or not _being_replaced(root):
                raise ArtifactError(
                    f"{root} is not a directory: pass the folder dynamo-export wrote"
                ) from None
            time.sleep(RETRY_PAUSE_S * 2**attempt)  # between a swap's two renames
            continue
        except OSError as exc:
            raise ArtifactError(
                f"{root} is not a directory: pass the folder dynamo-export wrote ({exc.strerror})"
            ) from exc
        try:
            return _read_pinned(root, fd, check_hashes, verify_signature)
        except ArtifactError:
            if last or not _replaced(root, fd):
                raise
        finally:
            os.close(fd)
        time.sleep(RETRY_PAUSE_S * 2**attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _being_replaced(root: Path) -> bool:
    """Whether runtime/atomic.py may be between the two renames of a swap of `root`: its temporaries
    (`.NAME.old-*`, `.NAME.tmp-*`) sit beside it. A plain missing folder fails at once."""
    temporaries = (f".{root.name}.old-", f".{root.name}.tmp-")
    try:
        with os.scandir(root.parent) as entries:
            return any(entry.name.startswith(temporaries) for entry in entries)
    except OSError:
        return False


def _replaced(root: Path, fd: int) -> bool:
    """Whether `root` names another directory than the pinned `fd` now (or nothing)."""
    try:
        now = os.stat(root)
    except OSError:
        return True
    pinned = os.fstat(fd)
    return (now.st_dev, now.st_ino) != (pinned.st_dev, pinned.st_ino)


def _read_pinned(
    root: Path, fd: int, check_hashes: bool, public_key: str | os.PathLike | None
) -> ArtifactFiles:
    files, links = _listing(fd)
    if links:
        raise ArtifactFileError(f"{links[0]} is a symbolic link; artifacts may not contain links")
    if MANIFEST_NAME not in files:
        raise ArtifactError(
            f"{root} has no {MANIFEST_NAME}: it is not a dynamo-export artifact (export one first)"
        )
    manifest_bytes = _read_file(fd, MANIFEST_NAME, limit=MAX_MANIFEST_BYTES)
    signed = None
    signature = None
    if public_key is not None:
        from runtime.signing import SignatureError, signed_digests  # model-signing is an extra

        if SIGNATURE_NAME not in files:
            raise SignatureError(
                f"{root} has no {SIGNATURE_NAME}: it is not signed; sign it with dynamo-export --sign KEY "
                "or load it without verify_signature"
            )
        signature = _read_file(fd, SIGNATURE_NAME, limit=MAX_SIGNATURE_BYTES)
        signed = signed_digests(signature, public_key, root)
        _check_signed(MANIFEST_NAME, manifest_bytes, signed)
    try:
        text = manifest_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{root / MANIFEST_NAME} is not UTF-8 text: {exc}") from exc
    manifest = parse_manifest(text)
    listed = {f for f in files if Path(f).name != MANIFEST_NAME and f != SIGNATURE_NAME}
    missing = sorted(set(manifest.files) - listed)
    extra = sorted(listed - set(manifest.files))
    if missing:
        raise ArtifactFileError(f"files listed in the manifest are missing: {missing}")
    if extra:
        raise ArtifactFileError(
            f"files not listed in the manifest are present: {extra}; remove them or re-export"
        )
    if signed is not None and set(signed) != {MANIFEST_NAME, *manifest.files}:
        from runtime.signing import SignatureError

        unsigned = sorted({MANIFEST_NAME, *manifest.files} - set(signed))
        gone = sorted(set(signed) - {MANIFEST_NAME, *manifest.files})
        raise SignatureError(
            f"{root}: the signature does not cover the artifact's files (unsigned {unsigned[:5]}, signed "
            f"but absent {gone[:5]}): the artifact was changed after signing; re-export and sign it"
        )
    opened = {}
    try:
        # Every file opened before any is read: from then on, a deletion of the directory (the
        # old one, after a swap) cannot take a file away from this load any more.
        for rel, entry in sorted(manifest.files.items()):
            opened[rel] = _open_file(fd, rel, size=entry.size)
        contents = {}
        for rel, file_fd in opened.items():
            data = _read_exactly(file_fd, rel, manifest.files[rel].size)
            if signed is not None:  # first: for a signed artifact, the signature is the authority
                _check_signed(rel, data, signed)
            if check_hashes and hashlib.sha256(data).hexdigest() != manifest.files[rel].sha256:
                raise ArtifactFileError(
                    f"{rel} does not match its sha256 in the manifest: the file was modified or corrupted"
                )
            contents[rel] = data
    finally:
        for file_fd in opened.values():
            os.close(file_fd)
    return ArtifactFiles(root, manifest, manifest_bytes, contents, signature)


def _check_signed(rel: str, data: bytes, signed: dict[str, str]) -> None:
    from runtime.signing import SignatureError

    if signed.get(rel) != hashlib.sha256(data).hexdigest():
        raise SignatureError(
            f"{rel} does not match the artifact's signature: it was modified after signing "
            "(or the signature belongs to another artifact); re-export and sign it"
        )


def _listing(root_fd: int) -> tuple[list[str], list[str]]:
    """(files, symbolic links) under the pinned directory, as relative paths; iterative (a tree
    nested thousands deep must not exhaust the stack) and holding one descriptor at a time."""
    files, links, folders = [], [], [""]
    while folders:
        rel = folders.pop()
        try:
            fd = os.open(rel, _DIR_FLAGS, dir_fd=root_fd) if rel else os.dup(root_fd)
        except OSError as exc:
            raise _file_error(rel, exc) from exc
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    path = f"{rel}/{entry.name}" if rel else entry.name
                    if entry.is_symlink():
                        links.append(path)
                    elif entry.is_dir(follow_symlinks=False):
                        folders.append(path)
                    else:
                        files.append(path)
        finally:
            os.close(fd)
    return sorted(files), sorted(links)


def _read_file(root_fd: int, rel: str, size: int | None = None, limit: int | None = None) -> bytes:
    """`rel`'s bytes, read once (`_open_file` says which files it accepts)."""
    fd = _open_file(root_fd, rel, size, limit)
    try:
        return _read_exactly(fd, rel, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _open_file(root_fd: int, rel: str, size: int | None = None, limit: int | None = None) -> int:
    """A descriptor of `rel`, opened beneath the pinned directory one component at a time without
    following links: a regular file with one link, of exactly `size` bytes when given, else at
    most `limit`."""
    *folders, name = rel.split("/")
    parents = []
    fd = None
    try:
        parent = root_fd
        for folder in folders:
            parent = os.open(folder, _DIR_FLAGS, dir_fd=parent)
            parents.append(parent)
        fd = os.open(name, _FILE_FLAGS, dir_fd=parent)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactFileError(f"{rel} is not a regular file")
        if info.st_nlink > 1:
            raise ArtifactFileError(f"{rel} has {info.st_nlink} hard links; artifacts may not contain links")
        if size is not None and info.st_size != size:
            raise ArtifactFileError(
                f"{rel} is {info.st_size} bytes, the manifest says {size}: truncated or replaced"
            )
        if limit is not None and info.st_size > limit:
            error = ManifestError if rel == MANIFEST_NAME else ArtifactFileError
            raise error(f"{rel} is larger than {limit} bytes; refusing to read it")
    except OSError as exc:
        if fd is not None:
            os.close(fd)
        raise _file_error(rel, exc) from exc
    except ArtifactError:
        os.close(fd)
        raise
    finally:
        for parent in reversed(parents):
            os.close(parent)
    return fd


def _read_exactly(fd: int, rel: str, size: int) -> bytes:
    """The `size` bytes of an open file, which must end there."""
    chunks, left = [], size
    try:
        while left:
            chunk = os.read(fd, min(left, _CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        grew = bool(os.read(fd, 1))
    except OSError as exc:
        raise _file_error(rel, exc) from exc
    except MemoryError as exc:
        raise ArtifactFileError(f"{rel}: not enough memory to read its {size:,} bytes") from exc
    if left or grew:
        raise ArtifactFileError(f"{rel} changed size while it was read: another process is writing it")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _file_error(rel: str, exc: OSError) -> ArtifactFileError:
    if exc.errno == errno.ELOOP:
        return ArtifactFileError(f"{rel} is a symbolic link; artifacts may not contain links")
    if exc.errno == errno.ENOENT:
        return ArtifactFileError(
            f"{rel} vanished while the artifact was read: another process is replacing it"
        )
    return ArtifactFileError(f"{rel} cannot be read: {exc.strerror}")
