"""The co-occurrence directory on disk: its format, validation, writing and reading.

DynaMo corrects the product of the heads' marginals with W(a,b) = p(a,b) / (p(a) p(b))
and W(a,b,c) = p(a,b,c) / (p(a) p(b) p(c)), counted on the training corpus
(dynamo_export/cooccurrence.py defines the p^ exactly). An n-gram that was never seen,
or seen fewer than `min_count` times, has W = 0.

Format (FORMAT_VERSION 1): a directory holding

- `cooccurrence.json` — format name and version, vocab_size, orders ([2] or [2, 3]),
  num_tokens, ngram_positions (the denominators of p^ per order), min_count, eot_id,
  value_dtype, index_dtype and nnz per order; `tokenizer_fingerprint` when the token file
  had one (runtime/fingerprint.py; optional, so older directories still load).
- `pairs.npz` — a scipy.sparse CSR array of shape (V, V): entry (a, b) = W(a, b).
- `triples.npz` — a CSR array of shape (P, V), P = nnz of pairs.npz: row r belongs to
  the r-th stored entry (a, b) of pairs.npz in CSR order (a ascending, then b
  ascending), and entry (r, c) = W(a, b, c). pairs.npz is therefore the pair-id table;
  this works because count(a,b) >= count(a,b,c), so every stored triple's prefix pair
  is stored too. Rows of pairs whose triples all fell under min_count are empty.

Both .npz files are what `scipy.sparse.save_npz(compressed=True)` writes, so
`scipy.sparse.load_npz` opens them. This module reads them itself, member by member:
each .npy header is checked (dtype, shape, byte count against the zip directory and
the JSON's declared sizes) before any array is read, nothing is unpickled, and every
problem raises CooccurrenceFileError naming the file and the fix.

Dtypes, measured on 7.9M tokens of the CPython 3.11 standard library with a 50k
byte-level BPE (benchmarks/bench_cooccurrence.py, min_count 1):

- values float32. float16 cannot hold W: W(a,b) reaches about N / count(b) for a rare
  pair and W(a,b,c) about N**2 / (count(b) count(c)), far beyond float16's 65504 (1.5%
  of pair and 23% of triple weights overflow; max W 7.9e6 and 2.1e13), and its 11-bit
  mantissa has relative error up to 4.9e-4. It would save only 26% (pairs) and 34%
  (triples) of the compressed files. float32's relative error, 6e-8, is far below
  anything the sampler can notice.
- indices and indptr int32: V <= MAX_VOCAB_SIZE and nnz < 2**31 always fit; int64 would
  add only 3-4% after deflate, but twice the memory once loaded.

The lookup over candidate grids that the decoding loop calls every step is runtime/cooccurrence.py.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse

from runtime.atomic import atomic_directory
from runtime.errors import CooccurrenceFileError
from runtime.fingerprint import is_fingerprint

FORMAT_NAME = "dynamo-cooccurrence"
FORMAT_VERSION = 1
META_NAME = "cooccurrence.json"
MATRIX_NAMES = {2: "pairs.npz", 3: "triples.npz"}
SUPPORTED_ORDERS = ((2,), (2, 3))
VALUE_DTYPE = np.dtype("<f4")
INDEX_DTYPE = np.dtype("<i4")
MAX_VOCAB_SIZE = 1 << 21  # the counter's base-V triple keys a*V*V + b*V + c must fit in int64
MAX_NNZ = np.iinfo(np.int32).max  # int32 indptr
MAX_META_BYTES = 1 << 16

_INT64_MAX = np.iinfo(np.int64).max
_CSR_MEMBERS = frozenset({"data.npy", "indices.npy", "indptr.npy", "format.npy", "shape.npy"})
_OPTIONAL_MEMBERS = frozenset({"_is_array.npy"})  # save_npz adds it for sparse arrays (not matrices)
# NotImplementedError: zipfile meets a feature it lacks (a newer zip version, patched data, strong encryption).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, KeyError, NotImplementedError)
_NPZ_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what np.savez / scipy.sparse.save_npz write
_REBUILD = "rebuild it with dynamo-cooccur"


@dataclass(frozen=True)
class CooccurrenceMeta:
    """cooccurrence.json. ngram_positions[n] is the number of in-document n-gram positions of the corpus."""

    vocab_size: int
    orders: tuple[int, ...]
    num_tokens: int
    ngram_positions: dict[int, int]
    min_count: int
    eot_id: int
    nnz: dict[int, int]
    value_dtype: str = "float32"
    index_dtype: str = "int32"
    format_version: int = FORMAT_VERSION
    tokenizer_fingerprint: str | None = None

    def to_json(self) -> dict:
        fingerprint = {"tokenizer_fingerprint": self.tokenizer_fingerprint}
        if self.tokenizer_fingerprint is None:
            fingerprint = {}
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "vocab_size": self.vocab_size,
            "orders": list(self.orders),
            "num_tokens": self.num_tokens,
            "ngram_positions": {str(n): v for n, v in self.ngram_positions.items()},
            "min_count": self.min_count,
            "eot_id": self.eot_id,
            "value_dtype": self.value_dtype,
            "index_dtype": self.index_dtype,
            "nnz": {str(n): v for n, v in self.nnz.items()},
            **fingerprint,
        }


@dataclass(frozen=True)
class CsrArrays:
    """A validated canonical CSR matrix: indices sorted and unique within each row, values finite and > 0."""

    shape: tuple[int, int]
    indptr: np.ndarray  # (rows + 1,) int32
    indices: np.ndarray  # (nnz,) int32
    data: np.ndarray  # (nnz,) float32
    keys: np.ndarray  # (nnz,) int64 row * cols + col, strictly increasing


# ---------------------------------------------------------------------------------------------- writing


def save_cooccurrence(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    num_tokens: int,
    ngram_positions: Mapping[int, int],
    min_count: int,
    eot_id: int,
    weights: Mapping[int, tuple[np.ndarray, np.ndarray]],
    force: bool = False,
    tokenizer_fingerprint: str | None = None,
) -> CooccurrenceMeta:
    """Write a co-occurrence directory atomically (runtime/atomic.py).

    `weights[n] = (keys, w)`: strictly increasing base-V n-gram codes (a*V + b,
    (a*V + b)*V + c) and their W > 0. An existing `out_dir` is replaced only with
    `force=True`, and only if it is empty or a co-occurrence directory itself.
    """
    out = Path(out_dir)
    _check_target(out, force)
    orders = tuple(sorted(weights))
    if orders not in SUPPORTED_ORDERS:
        raise CooccurrenceFileError(f"orders must be one of {SUPPORTED_ORDERS}, got {orders}")
    if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
        raise CooccurrenceFileError(f"vocab_size must lie in [1, {MAX_VOCAB_SIZE}], got {vocab_size}")
    pair_keys = _checked_keys(weights[2][0], vocab_size, 2)
    matrices = {2: _pairs_csr(pair_keys, weights[2][1], vocab_size)}
    if 3 in orders:
        triple_keys = _checked_keys(weights[3][0], vocab_size, 3)
        matrices[3] = _triples_csr(triple_keys, weights[3][1], pair_keys, vocab_size)
    meta = CooccurrenceMeta(
        vocab_size=int(vocab_size),
        orders=orders,
        num_tokens=int(num_tokens),
        ngram_positions={n: int(ngram_positions[n]) for n in orders},
        min_count=int(min_count),
        eot_id=int(eot_id),
        nnz={n: int(m.nnz) for n, m in matrices.items()},
        tokenizer_fingerprint=tokenizer_fingerprint,
    )
    with atomic_directory(out, overwrite=force) as staging:
        for n, matrix in matrices.items():
            scipy.sparse.save_npz(staging / MATRIX_NAMES[n], matrix, compressed=True)
        (staging / META_NAME).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return meta


def _check_target(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise CooccurrenceFileError(
            f"{out} already exists; pass force=True (dynamo-cooccur --force) to replace it"
        )
    if out.is_symlink() or not out.is_dir():
        raise CooccurrenceFileError(f"{out} exists and is not a directory; refusing to replace it")
    if any(out.iterdir()) and not (out / META_NAME).is_file():
        raise CooccurrenceFileError(
            f"{out} is a non-empty directory without {META_NAME}; refusing to replace what is not "
            "a co-occurrence directory even with force (choose another --out)"
        )


def _checked_keys(keys: np.ndarray, vocab_size: int, order: int) -> np.ndarray:
    keys = np.asarray(keys)
    if keys.ndim != 1 or keys.dtype != np.int64:
        raise CooccurrenceFileError(
            f"{order}-gram keys must be a 1-D int64 array, got {keys.dtype} {keys.shape}"
        )
    if keys.size > MAX_NNZ:
        raise CooccurrenceFileError(
            f"{keys.size:,} {order}-grams exceed the format's int32 limit of {MAX_NNZ:,}; raise min_count"
        )
    if keys.size and (keys[0] < 0 or keys[-1] >= vocab_size**order or np.any(np.diff(keys) <= 0)):
        raise CooccurrenceFileError(f"{order}-gram keys must be strictly increasing codes in [0, V**{order})")
    return keys


def _checked_values(w: np.ndarray, n: int, order: int) -> np.ndarray:
    w = np.asarray(w)
    if w.shape != (n,) or not np.all(np.isfinite(w) & (w > 0)):
        raise CooccurrenceFileError(f"{order}-gram weights must be {n} finite values > 0, one per key")
    if np.any(w > np.finfo(VALUE_DTYPE).max):
        raise CooccurrenceFileError(f"{order}-gram weights exceed the float32 range")
    return w.astype(VALUE_DTYPE)


def _csr(rows: np.ndarray, cols: np.ndarray, w: np.ndarray, shape: tuple[int, int]) -> scipy.sparse.csr_array:
    """CSR from entries already in row-major order (no sort, no duplicate summing)."""
    indptr = np.zeros(shape[0] + 1, dtype=INDEX_DTYPE)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    matrix = scipy.sparse.csr_array((w, cols.astype(INDEX_DTYPE), indptr), shape=shape)
    # scipy may widen indices if it thinks they could overflow; the format promises int32.
    if matrix.indices.dtype != INDEX_DTYPE or matrix.indptr.dtype != INDEX_DTYPE:
        raise CooccurrenceFileError(f"a {shape} matrix cannot be stored with int32 indices")
    return matrix


def _pairs_csr(keys: np.ndarray, w: np.ndarray, vocab_size: int) -> scipy.sparse.csr_array:
    rows, cols = np.divmod(keys, vocab_size)
    return _csr(rows, cols, _checked_values(w, keys.size, 2), (vocab_size, vocab_size))


def _triples_csr(
    keys: np.ndarray, w: np.ndarray, pair_keys: np.ndarray, vocab_size: int
) -> scipy.sparse.csr_array:
    prefix, cols = np.divmod(keys, vocab_size)
    rows = np.searchsorted(pair_keys, prefix)
    missing = rows >= pair_keys.size
    missing[~missing] = pair_keys[rows[~missing]] != prefix[~missing]
    if np.any(missing):
        raise CooccurrenceFileError(
            f"{int(missing.sum())} triples have a prefix pair that is not stored; pairs and triples must "
            "come from the same count with the same min_count"
        )
    return _csr(rows, cols, _checked_values(w, keys.size, 3), (pair_keys.size, vocab_size))


# ---------------------------------------------------------------------------------------------- reading


def load_cooccurrence(
    path: str | os.PathLike,
    expected_vocab_size: int | None = None,
    max_bytes: int | None = None,
    contents: Mapping[str, bytes] | None = None,
) -> tuple[CooccurrenceMeta, dict[int, CsrArrays]]:
    """Read and validate a co-occurrence directory: (meta, {order: CSR arrays}).

    `max_bytes` caps what the header's declared sizes may make the load allocate (the arrays
    read plus the lookup's key arrays): a header declaring billions of entries is refused
    before any array is read, instead of failing gigabytes later. `contents` (file name ->
    bytes) are the directory's files already read, and checked, by the artifact loader
    (runtime/artifact_files.py): then no file is opened, and `path` only names them in messages.
    """
    root = Path(path)
    files = contents or {}
    meta = _read_meta(root, files.get(META_NAME), contents is not None)
    if expected_vocab_size is not None and expected_vocab_size != meta.vocab_size:
        raise CooccurrenceFileError(
            f"{root} was counted for a vocabulary of {meta.vocab_size} tokens but the model has "
            f"{expected_vocab_size}: rebuild it with dynamo-cooccur from a token file of the model's tokenizer"
        )
    V = meta.vocab_size
    if max_bytes is not None and loaded_bytes(meta) > max_bytes:
        raise CooccurrenceFileError(
            f"{root} declares {sum(meta.nnz.values()):,} n-grams, {loaded_bytes(meta):,} bytes once loaded, over "
            f"max_memory_bytes={max_bytes:,}: count the masks with a higher --min-count, or raise the limit"
        )
    try:
        matrices = {
            n: _read_csr(root / name, shape, meta.nnz[n], files.get(name), contents is not None)
            for n, name, shape in ((2, MATRIX_NAMES[2], (V, V)), (3, MATRIX_NAMES[3], (meta.nnz[2], V)))
            if n in meta.orders
        }
    except MemoryError as exc:
        raise CooccurrenceFileError(
            f"{root}: not enough memory for its {sum(meta.nnz.values()):,} n-grams "
            f"({loaded_bytes(meta):,} bytes): count them with a higher --min-count"
        ) from exc
    return meta, matrices


def loaded_bytes(meta: CooccurrenceMeta) -> int:
    """Bytes the arrays of `meta`'s declared sizes take once loaded: per entry its index, value and
    int64 lookup key; per row its int64 pointer."""
    entry = np.dtype(INDEX_DTYPE).itemsize + np.dtype(VALUE_DTYPE).itemsize + 8
    rows = meta.vocab_size + (meta.nnz[2] if 3 in meta.orders else 0)
    return sum(meta.nnz.values()) * entry + 8 * (rows + len(meta.orders))


def _read_meta(root: Path, data: bytes | None = None, in_memory: bool = False) -> CooccurrenceMeta:
    """The header, from `data` when the loader read it already (`in_memory`), else from the directory."""
    path = root / META_NAME
    if in_memory and data is None:
        raise CooccurrenceFileError(f"{path} not found: {root} is not a co-occurrence directory ({_REBUILD})")
    if not in_memory:
        if not root.is_dir():
            raise CooccurrenceFileError(
                f"{root} is not a directory; make a co-occurrence directory with dynamo-cooccur"
            )
        if not path.is_file():
            raise CooccurrenceFileError(
                f"{path} not found: {root} is not a co-occurrence directory ({_REBUILD})"
            )
        if path.stat().st_size > MAX_META_BYTES:
            raise CooccurrenceFileError(
                f"{path} is larger than {MAX_META_BYTES} bytes; it is not a {META_NAME}"
            )
        data = path.read_bytes()
    if len(data) > MAX_META_BYTES:
        raise CooccurrenceFileError(f"{path} is larger than {MAX_META_BYTES} bytes; it is not a {META_NAME}")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (
        ValueError,
        RecursionError,
    ) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: deep nesting
        raise CooccurrenceFileError(f"{path} is not valid JSON ({exc}); {_REBUILD}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CooccurrenceFileError(f"{path} is not a {FORMAT_NAME} header")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CooccurrenceFileError(
            f"{path} has format_version {raw.get('format_version')!r}; this runtime reads version "
            f"{FORMAT_VERSION}: {_REBUILD} or upgrade the runtime"
        )

    def field(name: str, lo: int, hi: int) -> int:
        value = raw.get(name)
        if type(value) is not int or not lo <= value <= hi:
            raise CooccurrenceFileError(f"{path}: {name} must be an integer in [{lo}, {hi}], got {value!r}")
        return value

    vocab_size = field("vocab_size", 1, MAX_VOCAB_SIZE)
    orders = raw.get("orders")
    if not isinstance(orders, list) or tuple(orders) not in SUPPORTED_ORDERS:
        raise CooccurrenceFileError(f"{path}: orders must be one of {[list(o) for o in SUPPORTED_ORDERS]}")
    orders = tuple(orders)
    for name, dtype in (("value_dtype", VALUE_DTYPE), ("index_dtype", INDEX_DTYPE)):
        if raw.get(name) != dtype.name:
            raise CooccurrenceFileError(f"{path}: {name} must be {dtype.name!r}, got {raw.get(name)!r}")
    nnz = _per_order(raw, "nnz", orders, path, lambda n: min(MAX_NNZ, vocab_size**n))
    positions = _per_order(raw, "ngram_positions", orders, path, lambda n: _INT64_MAX)
    meta = CooccurrenceMeta(
        vocab_size=vocab_size,
        orders=orders,
        num_tokens=field("num_tokens", 0, _INT64_MAX),
        ngram_positions=positions,
        min_count=field("min_count", 1, _INT64_MAX),
        eot_id=field("eot_id", 0, vocab_size - 1),
        nnz=nnz,
        tokenizer_fingerprint=raw.get("tokenizer_fingerprint"),
    )
    if meta.tokenizer_fingerprint is not None and not is_fingerprint(meta.tokenizer_fingerprint):
        raise CooccurrenceFileError(f"{path}: tokenizer_fingerprint must be 64 hex digits; {_REBUILD}")
    return meta


def _per_order(raw: dict, name: str, orders: tuple[int, ...], path: Path, cap) -> dict[int, int]:
    table = raw.get(name)
    if not isinstance(table, dict) or set(table) != {str(n) for n in orders}:
        raise CooccurrenceFileError(
            f"{path}: {name} must map each order {list(orders)} (as a string) to a count"
        )
    out = {}
    for n in orders:
        value = table[str(n)]
        if type(value) is not int or not 0 <= value <= cap(n):
            raise CooccurrenceFileError(
                f"{path}: {name}[{n}] must be an integer in [0, {cap(n)}], got {value!r}"
            )
        out[n] = value
    return out


def _read_csr(
    path: Path, shape: tuple[int, int], nnz: int, data: bytes | None = None, in_memory: bool = False
) -> CsrArrays:
    """One matrix file, from `data` when the loader read it already (`in_memory`), else from `path`."""
    missing = data is None if in_memory else not path.is_file()
    if missing:
        raise CooccurrenceFileError(f"{path} not found; the header lists it ({_REBUILD})")
    try:
        with zipfile.ZipFile(io.BytesIO(data) if in_memory else path) as zf:
            names = set(zf.namelist())
            if not _CSR_MEMBERS <= names <= _CSR_MEMBERS | _OPTIONAL_MEMBERS:
                raise CooccurrenceFileError(
                    f"{path} holds {sorted(names)}; a CSR .npz holds {sorted(_CSR_MEMBERS)}"
                )
            sparse_format = _read_member(zf, path, "format.npy", np.dtype("S3"), ())
            if sparse_format.item() != b"csr":
                raise CooccurrenceFileError(f"{path} stores a {sparse_format.item()!r} matrix, not csr")
            stored_shape = _read_member(zf, path, "shape.npy", np.dtype("<i8"), (2,))
            if tuple(stored_shape.tolist()) != shape:
                raise CooccurrenceFileError(
                    f"{path} declares shape {tuple(stored_shape.tolist())} but the header implies {shape}"
                )
            indptr = _read_member(zf, path, "indptr.npy", INDEX_DTYPE, (shape[0] + 1,))
            indices = _read_member(zf, path, "indices.npy", INDEX_DTYPE, (nnz,))
            data = _read_member(zf, path, "data.npy", VALUE_DTYPE, (nnz,))
    except _READ_ERRORS as exc:
        raise CooccurrenceFileError(
            f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}); {_REBUILD}"
        ) from exc
    return _validated_csr(path, shape, indptr, indices, data)


def _read_member(zf: zipfile.ZipFile, path: Path, name: str, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """One .npy member, its header checked before any data is read; never unpickles."""
    info = zf.getinfo(name)
    if info.flag_bits & 0x1 or info.compress_type not in _NPZ_COMPRESSION:
        raise CooccurrenceFileError(
            f"{path}:{name} is encrypted or uses zip compression method {info.compress_type}; "
            f"save_npz writes only stored or deflated members ({_REBUILD})"
        )
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            got_shape, _, got_dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            got_shape, _, got_dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise CooccurrenceFileError(f"{path}:{name} has unsupported .npy version {version}")
        # Every member is 0-D or 1-D, so the header's Fortran-order flag cannot matter.
        if got_dtype.hasobject or got_dtype != dtype or tuple(got_shape) != shape:
            raise CooccurrenceFileError(
                f"{path}:{name} holds {got_dtype} {tuple(got_shape)}; expected {dtype} {shape} ({_REBUILD})"
            )
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if info.file_size != f.tell() + nbytes:
            raise CooccurrenceFileError(
                f"{path}:{name} is {info.file_size} bytes, not the {f.tell() + nbytes} its header declares"
            )
        buf = f.read(nbytes)
        if len(buf) != nbytes or f.read(1):  # reading to the end makes zipfile check the CRC
            raise CooccurrenceFileError(f"{path}:{name} is truncated")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _validated_csr(
    path: Path, shape: tuple[int, int], indptr: np.ndarray, indices: np.ndarray, data: np.ndarray
) -> CsrArrays:
    nnz = indices.size
    if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
        raise CooccurrenceFileError(
            f"{path}: indptr must rise monotonically from 0 to nnz={nnz} ({_REBUILD})"
        )
    if nnz and (indices.min() < 0 or indices.max() >= shape[1]):
        raise CooccurrenceFileError(
            f"{path}: column indices span [{indices.min()}, {indices.max()}], outside [0, {shape[1]}) ({_REBUILD})"
        )
    if not np.all(np.isfinite(data) & (data > 0)):
        raise CooccurrenceFileError(f"{path}: weights must be finite and > 0 ({_REBUILD})")
    keys = _row_major_keys(indptr, indices, shape[1])
    if np.any(keys[1:] <= keys[:-1]):
        raise CooccurrenceFileError(
            f"{path}: column indices must be sorted and unique within each row ({_REBUILD})"
        )
    return CsrArrays(shape=shape, indptr=indptr, indices=indices, data=data, keys=keys)


def _row_major_keys(indptr: np.ndarray, indices: np.ndarray, ncols: int) -> np.ndarray:
    """row * ncols + col for every stored entry: strictly increasing exactly when the CSR is canonical."""
    rows = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
    return rows * ncols + indices
