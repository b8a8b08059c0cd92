"""The reference corpus: the Python 3.11 documentation sources, split by file.

Debian's `python3.11-doc` package ships the reStructuredText sources of the
docs (about 500 files, 11 MB of English prose and code). We fetch the package
with `apt-get download` and unpack it with `dpkg -x`, so nothing is installed
and no corpus text has to live in git; any Debian-based machine rebuilds the
same corpus.

Layout of the output directory:

    DIR/train/<relpath>.rst.txt     one document per file
    DIR/heldout/<relpath>.rst.txt
    DIR/manifest.json               package version, split rule, per-file sha256

The held-out split is chosen by file (a document never straddles the split):
the `round(3% x N)` files whose sha256(relative POSIX path) hex digests sort
lowest are held out. It depends only on the file names, so it is the same on
every machine and run, and exactly 3% of the files (a random sample of them).

The directory is built in a temporary sibling and renamed into place, so it is
either absent or complete; `fetch_corpus` skips the work when the manifest's
hashes still match the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from dynamo_export.errors import DataError
from runtime.atomic import atomic_directory

PACKAGE = "python3.11-doc"
SOURCES_DIR = "usr/share/doc/python3.11/html/_sources"
SOURCE_GLOB = "*.rst.txt"
HELDOUT_PERCENT = 3
SPLITS = ("train", "heldout")
SPLIT_RULE = (
    f"held out = the round({HELDOUT_PERCENT}% x N) files whose sha256(relative POSIX path) "
    "hex digests sort lowest"
)
MANIFEST = "manifest.json"


def split_paths(relpaths: list[str]) -> tuple[list[str], list[str]]:
    """Split relative paths into (train, heldout), both sorted; see the module docstring."""
    if len(set(relpaths)) != len(relpaths):
        raise DataError("split_paths got duplicate paths; each file must appear once")
    num_heldout = round(len(relpaths) * HELDOUT_PERCENT / 100)
    by_hash = sorted(relpaths, key=lambda p: hashlib.sha256(p.encode("utf-8")).hexdigest())
    heldout = set(by_hash[:num_heldout])
    train = sorted(p for p in relpaths if p not in heldout)
    return train, sorted(heldout)


def collect_sources(unpacked_root: str | os.PathLike) -> list[str]:
    """Sorted POSIX paths of the doc sources, relative to the package's `_sources` directory."""
    sources = Path(unpacked_root) / SOURCES_DIR
    if not sources.is_dir():
        raise DataError(
            f"{sources} does not exist: {unpacked_root} is not an unpacked {PACKAGE} package "
            f"(expected {SOURCES_DIR}/**/{SOURCE_GLOB} inside it)"
        )
    relpaths = sorted(p.relative_to(sources).as_posix() for p in sources.rglob(SOURCE_GLOB) if p.is_file())
    if not relpaths:
        raise DataError(f"{sources} holds no {SOURCE_GLOB} files; the {PACKAGE} package layout changed")
    return relpaths


def download_package(package: str, dest: Path) -> Path:
    """`apt-get download` the package's .deb into `dest`; refresh the package lists once if needed.

    A fresh Debian image ships without package lists, so the first download
    fails; `apt-get update` fixes that and needs no installation.
    """
    try:
        _run(["apt-get", "download", package], cwd=dest)
    except DataError as first:
        print(f"apt-get download {package} failed; running apt-get update and retrying", flush=True)
        try:
            _run(["apt-get", "update"], cwd=dest)
            _run(["apt-get", "download", package], cwd=dest)
        except DataError as second:
            raise DataError(
                f"could not download {package} with apt-get (first try: {first}; after apt-get update: "
                f"{second}). Run on a Debian/Ubuntu machine whose package lists offer {package} "
                f"(check with `apt-cache policy {package}`)."
            ) from second
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise DataError(f"expected one {package}_*.deb in {dest} after apt-get download, found {debs}")
    return debs[0]


def _run(cmd: list[str], cwd: Path) -> str:
    if shutil.which(cmd[0]) is None:
        raise DataError(f"{cmd[0]} is not on PATH: fetching the corpus needs a Debian-based machine")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DataError(f"`{' '.join(cmd)}` exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def build_corpus(unpacked_root: str | os.PathLike, out_dir: str | os.PathLike, package_info: dict) -> dict:
    """Copy the sources of an unpacked package into `out_dir`'s split directories and write the manifest.

    `package_info` (package name, version, .deb sha256) is recorded in the
    manifest so the corpus states exactly what it was built from.
    """
    out = Path(out_dir)
    sources = Path(unpacked_root) / SOURCES_DIR
    train, heldout = split_paths(collect_sources(unpacked_root))
    with atomic_directory(out, overwrite=True) as tmp:
        splits = {}
        for split, relpaths in zip(SPLITS, (train, heldout), strict=True):
            entries = []
            for rel in relpaths:
                data = (sources / rel).read_bytes()
                _check_utf8(data, sources / rel)
                target = tmp / split / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                entries.append({"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            splits[split] = entries
        manifest = {**package_info, "source_dir": SOURCES_DIR, "split_rule": SPLIT_RULE, "splits": splits}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _check_utf8(data: bytes, path: Path) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); the corpus expects UTF-8 sources") from exc


def verified_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The corpus manifest if its split follows today's rule and every file matches its sha256, else None."""
    out = Path(out_dir)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        train, heldout = ([entry["path"] for entry in manifest["splits"][split]] for split in SPLITS)
        if (train, heldout) != split_paths(train + heldout):
            return None
        for split in SPLITS:
            for entry in manifest["splits"][split]:
                data = (out / split / entry["path"]).read_bytes()
                if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def fetch_corpus(out_dir: str | os.PathLike, package: str = PACKAGE) -> dict:
    """Download, unpack and split the corpus into `out_dir`; reuse it when already present and intact."""
    manifest = verified_manifest(out_dir)
    if manifest is not None:
        print(f"corpus in {out_dir} is present and verified; skipping the download", flush=True)
        return manifest
    with tempfile.TemporaryDirectory(prefix="dynamo-corpus-") as work:
        deb = download_package(package, Path(work))
        version = _run(["dpkg-deb", "--field", str(deb), "Version"], cwd=Path(work)).strip()
        _run(["dpkg", "-x", str(deb), "unpacked"], cwd=Path(work))
        package_info = {
            "package": package,
            "version": version,
            "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
        }
        return build_corpus(Path(work) / "unpacked", out_dir, package_info)


def split_files(out_dir: str | os.PathLike, split: str) -> list[Path]:
    """The files of one split in manifest (sorted) order, for tokenizer training and tokenization."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    manifest = verified_manifest(out_dir)
    if manifest is None:
        raise DataError(
            f"{out_dir} is not a complete corpus; build it with `dynamo-data fetch-corpus --out {out_dir}`"
        )
    return [Path(out_dir) / split / entry["path"] for entry in manifest["splits"][split]]
