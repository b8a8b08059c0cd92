"""Check an artifact's ONNX graph before ONNX Runtime opens it.

ONNX Runtime reads a tensor's external data while it builds the session, from
whatever `location`, `offset` and `length` the graph names. A graph from a
stranger could point that read outside the artifact (`../../etc/passwd`, an
absolute path, a symlink, a hard link), at a process address through ORT's
in-memory marker `*/_ORT_MEM_ADDR_/*`, past the end of the data file, or declare
a tensor far larger than its bytes. Recent ORT releases reject most of this
themselves; checking first means an older or future ORT never sees such a
graph, and the caller gets one typed error naming the tensor and the fix.

Checked here, for every tensor of the graph (initializers, tensors inside node
attributes, subgraphs):
- external data lives in the one data file the manifest lists and hashes,
  reached by a plain relative path without links; offset + length fit in the
  file and length equals dims x dtype size; no unknown keys;
- inline data holds exactly dims x dtype size bytes (or values);
- no sparse tensors, subgraphs (If/Loop/Scan bodies), model-local functions
  or training info: the exporter emits none, and they are where ORT's own
  checks had gaps (external paths of sparse tensors up to 1.26, out-of-bounds
  reads on Loop/Scan bodies fixed in 1.30.1);
- operator domains are the ones the exporter emits: the default ONNX domain
  and `com.microsoft` (ORT's transformer fusions, `--optimize`); the default
  domain's opset is the manifest's;
- the graph's inputs and outputs are the manifest's: names, element types,
  ranks, named and fixed axes.

Why a hand-written protobuf reader: runtime/ may import only numpy, scipy,
onnxruntime, tokenizers and the standard library (applications embed it
without the export tool chain), the `onnx` package is not among them, and
onnxruntime offers no way to look at a model without building a session,
which is exactly when the external data is read. The ONNX protobuf wire
format is small and stable: this module decodes only the fields it needs
(field numbers from onnx/onnx.proto, ONNX 1.23), read-only, from a memory map,
and checks every length against the bytes that remain before it looks at
them, so a hostile file costs at most one pass over its own bytes. Fields it
does not need are skipped by their wire type; tests compare what it reads
with the `onnx` package on real exports.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from runtime.errors import GraphError
from runtime.manifest import Manifest

MAX_GRAPH_BYTES = 2**31 - 1  # protobuf cannot encode a larger message
MAX_SUBGRAPH_DEPTH = 8
MAX_RANK = 64
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum"})
ORT_MEMORY_MARKER = "_ORT_MEM_ADDR_"

# TensorProto.DataType -> (name, bits per element). STRING (8) has no fixed size.
DATA_TYPES = {
    1: ("float32", 32), 2: ("uint8", 8), 3: ("int8", 8), 4: ("uint16", 16), 5: ("int16", 16),
    6: ("int32", 32), 7: ("int64", 64), 8: ("string", 0), 9: ("bool", 8), 10: ("float16", 16),
    11: ("float64", 64), 12: ("uint32", 32), 13: ("uint64", 64), 14: ("complex64", 64),
    15: ("complex128", 128), 16: ("bfloat16", 16), 17: ("float8e4m3fn", 8), 18: ("float8e4m3fnuz", 8),
    19: ("float8e5m2", 8), 20: ("float8e5m2fnuz", 8), 21: ("uint4", 4), 22: ("int4", 4),
    23: ("float4e2m1", 4), 24: ("float8e8m0", 8), 25: ("uint2", 2), 26: ("int2", 2),
    27: ("float6e2m3", 6), 28: ("float6e3m2", 6),
}  # fmt: skip

# Wire types (protobuf encoding spec).
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
# TensorProto typed-data fields: field number -> (wire type of one packed element, values per element).
_FLOAT_DATA, _INT32_DATA, _STRING_DATA, _INT64_DATA, _DOUBLE_DATA, _UINT64_DATA = 4, 5, 6, 7, 10, 11
_TYPED_FIELD = {  # which typed field holds each data type, and how many entries one element takes
    1: (_FLOAT_DATA, 1), 14: (_FLOAT_DATA, 2), 11: (_DOUBLE_DATA, 1), 15: (_DOUBLE_DATA, 2),
    7: (_INT64_DATA, 1), 12: (_UINT64_DATA, 1), 13: (_UINT64_DATA, 1), 8: (_STRING_DATA, 1),
    **{t: (_INT32_DATA, 1) for t in (2, 3, 4, 5, 6, 9, 10, 16, 17, 18, 19, 20, 24)},
}  # fmt: skip


@dataclass
class TensorInfo:
    """What the checks need of one TensorProto; counts of typed entries stand in for the values."""

    where: str  # "initializer 'w'", "node 'n' attribute 'value'", ...
    name: str = ""
    data_type: int = 0
    dims: list[int] = field(default_factory=list)
    raw_bytes: int | None = None  # len(raw_data) when present
    typed: dict[int, int] = field(default_factory=dict)  # typed-data field number -> entries
    external: dict[str, str] = field(default_factory=dict)
    external_location: bool = False  # data_location == EXTERNAL
    segment: bool = False


@dataclass
class ValueInfo:
    """A graph input/output: elem_type 0 when it is not a tensor; dims hold ints, names or None."""

    name: str
    elem_type: int
    dims: list[int | str | None] | None  # None: no shape given


@dataclass
class GraphInfo:
    """The parts of a ModelProto the checks read (`read_graph`)."""

    opsets: dict[str, int] = field(default_factory=dict)
    node_domains: dict[str, int] = field(default_factory=dict)  # domain -> node count (all graphs)
    op_types: set[tuple[str, str]] = field(default_factory=set)  # (domain, op_type)
    tensors: list[TensorInfo] = field(default_factory=list)
    inputs: list[ValueInfo] = field(default_factory=list)
    outputs: list[ValueInfo] = field(default_factory=list)
    unsupported: list[str] = field(
        default_factory=list
    )  # sparse tensors, subgraphs, functions, training info


# ---------------------------------------------------------------------------------------------- wire format


class _Wire:
    """Decodes protobuf fields of buf[start:end] without copying the payloads."""

    def __init__(self, buf, path: str):
        self.buf = buf
        self.path = path

    def fail(self, what: str) -> GraphError:
        return GraphError(f"{self.path} is not a valid ONNX model ({what}); re-export it with dynamo-export")

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            if pos >= end or shift > 63:
                raise self.fail("a varint runs past its message")
            byte = self.buf[pos]
            value |= (byte & 0x7F) << shift
            pos += 1
            if byte < 0x80:
                return value, pos
            shift += 7

    def fields(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """(field number, wire type, value or payload start, payload end) for every field in order."""
        pos = start
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise self.fail("field number 0")
            if wire == _VARINT:
                value, pos = self.varint(pos, end)
                yield number, wire, value, pos
            elif wire in (_FIXED64, _FIXED32):
                size = 8 if wire == _FIXED64 else 4
                if pos + size > end:
                    raise self.fail("a fixed-size field runs past its message")
                yield number, wire, pos, pos + size
                pos += size
            elif wire == _LEN:
                length, pos = self.varint(pos, end)
                if length > end - pos:
                    raise self.fail(f"a field of {length} bytes runs past its message")
                yield number, wire, pos, pos + length
                pos += length
            else:  # 3/4 are deprecated groups, 6/7 do not exist
                raise self.fail(f"wire type {wire}")

    def text(self, start: int, end: int) -> str:
        try:
            return bytes(self.buf[start:end]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail("a string that is not UTF-8") from exc

    def packed_count(self, wire: int, start: int, end: int, element_wire: int) -> int:
        """Entries in one occurrence of a repeated field: packed scalars share one LEN field; strings not."""
        if wire != _LEN or element_wire == _LEN:
            return 1
        if element_wire == _FIXED32:
            return (end - start) // 4
        if element_wire == _FIXED64:
            return (end - start) // 8
        # Varints: one entry per byte below 0x80; translate drops the others at C speed.
        return len(bytes(self.buf[start:end]).translate(None, bytes(range(0x80, 0x100))))

    def int64s(self, wire: int, value: int, start: int, end: int) -> list[int]:
        """A repeated int64 field occurrence (packed or one varint), as signed values."""
        if wire == _VARINT:
            return [_signed(value)]
        if wire != _LEN:
            raise self.fail("an int64 list with a fixed-size wire type")
        out, pos = [], start
        while pos < end:
            number, pos = self.varint(pos, end)
            out.append(_signed(number))
        return out


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_TYPED_WIRE = {
    _FLOAT_DATA: _FIXED32, _INT32_DATA: _VARINT, _INT64_DATA: _VARINT, _DOUBLE_DATA: _FIXED64,
    _UINT64_DATA: _VARINT, _STRING_DATA: _LEN,
}  # fmt: skip


def _read_tensor(w: _Wire, start: int, end: int, where: str) -> TensorInfo:
    t = TensorInfo(where=where)
    for number, wire, value, stop in w.fields(start, end):
        if number == 1:  # dims
            t.dims += w.int64s(wire, value, value, stop)
        elif number == 2 and wire == _VARINT:  # data_type
            t.data_type = value
        elif number == 3:  # segment
            t.segment = True
        elif number == 8 and wire == _LEN:  # name
            t.name = w.text(value, stop)
            t.where = f"{where} {t.name!r}"
        elif number == 9 and wire == _LEN:  # raw_data
            t.raw_bytes = (t.raw_bytes or 0) + stop - value
        elif number == 13 and wire == _LEN:  # external_data: StringStringEntryProto
            key, text = _string_pair(w, value, stop)
            if key in t.external:
                raise GraphError(f"{t.where}: external_data repeats the key {key!r}")
            t.external[key] = text
        elif number == 14 and wire == _VARINT:  # data_location
            t.external_location = value == 1
        elif number in _TYPED_WIRE:
            t.typed[number] = t.typed.get(number, 0) + w.packed_count(wire, value, stop, _TYPED_WIRE[number])
    return t


def _string_pair(w: _Wire, start: int, end: int) -> tuple[str, str]:
    key = value = ""
    for number, wire, payload, stop in w.fields(start, end):
        if wire == _LEN and number == 1:
            key = w.text(payload, stop)
        elif wire == _LEN and number == 2:
            value = w.text(payload, stop)
    return key, value


def _read_value_info(w: _Wire, start: int, end: int) -> ValueInfo:
    info = ValueInfo(name="", elem_type=0, dims=None)
    for number, wire, value, stop in w.fields(start, end):
        if number == 1 and wire == _LEN:
            info.name = w.text(value, stop)
        elif number == 2 and wire == _LEN:  # TypeProto
            for t_number, t_wire, t_value, t_stop in w.fields(value, stop):
                if t_number == 1 and t_wire == _LEN:  # tensor_type
                    _read_tensor_type(w, t_value, t_stop, info)
    return info


def _read_tensor_type(w: _Wire, start: int, end: int, info: ValueInfo) -> None:
    for number, wire, value, stop in w.fields(start, end):
        if number == 1 and wire == _VARINT:
            info.elem_type = value
        elif number == 2 and wire == _LEN:  # TensorShapeProto
            info.dims = []
            for d_number, d_wire, d_value, d_stop in w.fields(value, stop):
                if d_number == 1 and d_wire == _LEN:
                    if len(info.dims) >= MAX_RANK:
                        raise GraphError(f"{w.path}: {info.name!r} has more than {MAX_RANK} dimensions")
                    info.dims.append(_read_dimension(w, d_value, d_stop))


def _read_dimension(w: _Wire, start: int, end: int) -> int | str | None:
    dim = None
    for number, wire, value, stop in w.fields(start, end):
        if number == 1 and wire == _VARINT:
            dim = _signed(value)
        elif number == 2 and wire == _LEN:
            dim = w.text(value, stop)
    return dim


def _read_graph(w: _Wire, start: int, end: int, info: GraphInfo, depth: int, label: str) -> None:
    if depth > MAX_SUBGRAPH_DEPTH:
        raise GraphError(f"{w.path}: subgraphs nest deeper than {MAX_SUBGRAPH_DEPTH} levels")
    for number, wire, value, stop in w.fields(start, end):
        if wire != _LEN:
            continue
        if number == 1:
            _read_node(w, value, stop, info, depth)
        elif number == 5:
            info.tensors.append(_read_tensor(w, value, stop, f"{label}initializer"))
        elif number == 15:
            info.unsupported.append(f"a sparse initializer in {label or 'the main graph'}")
        elif number == 11 and depth == 0:
            info.inputs.append(_read_value_info(w, value, stop))
        elif number == 12 and depth == 0:
            info.outputs.append(_read_value_info(w, value, stop))


def _read_node(w: _Wire, start: int, end: int, info: GraphInfo, depth: int) -> None:
    domain, op_type, name, attributes = "", "", "", []
    for number, wire, value, stop in w.fields(start, end):
        if wire != _LEN:
            continue
        if number == 7:
            domain = w.text(value, stop)
        elif number == 4:
            op_type = w.text(value, stop)
        elif number == 3:
            name = w.text(value, stop)
        elif number == 5:
            attributes.append((value, stop))
    info.node_domains[domain] = info.node_domains.get(domain, 0) + 1
    info.op_types.add((domain, op_type))
    for a_start, a_stop in attributes:
        _read_attribute(w, a_start, a_stop, info, depth, f"node {name or op_type!r}")


def _read_attribute(w: _Wire, start: int, end: int, info: GraphInfo, depth: int, node: str) -> None:
    name, tensors, graphs = "", [], []
    for number, wire, value, stop in w.fields(start, end):
        if wire != _LEN:
            continue
        if number == 1:
            name = w.text(value, stop)
        elif number in (5, 10):  # t, tensors
            tensors.append((value, stop))
        elif number in (6, 11):  # g, graphs
            graphs.append((value, stop))
        elif number in (22, 23):  # sparse_tensor, sparse_tensors
            info.unsupported.append(f"a sparse tensor in {node}")
    where = f"{node} attribute {name!r}"
    for t_start, t_stop in tensors:
        info.tensors.append(_read_tensor(w, t_start, t_stop, where))
    for g_start, g_stop in graphs:
        info.unsupported.append(f"a subgraph in {where}")
        _read_graph(w, g_start, g_stop, info, depth + 1, f"{where} subgraph ")


def _read_model(w: _Wire, size: int) -> GraphInfo:
    info = GraphInfo()
    graphs = 0
    for number, wire, value, stop in w.fields(0, size):
        if number == 7 and wire == _LEN:
            graphs += 1
            _read_graph(w, value, stop, info, 0, "")
        elif number == 8 and wire == _LEN:  # opset_import: OperatorSetIdProto
            domain, version = "", 0
            for o_number, o_wire, o_value, o_stop in w.fields(value, stop):
                if o_number == 1 and o_wire == _LEN:
                    domain = w.text(o_value, o_stop)
                elif o_number == 2 and o_wire == _VARINT:
                    version = _signed(o_value)
            info.opsets[domain] = version
        elif number == 20:
            info.unsupported.append("training info")
        elif number == 25:
            info.unsupported.append("a model-local function")
    if graphs != 1:
        raise w.fail(f"{graphs} graphs instead of one")
    return info


def read_graph(path: str | os.PathLike) -> GraphInfo:
    """Parse the fields of an .onnx file the checks need; GraphError if it is not a valid model."""
    path = Path(path)
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            raise GraphError(
                f"{path} is not a regular file (a link, directory or device); refusing to read it"
            )
        size = info.st_size
        if size == 0:
            raise GraphError(f"{path} is empty; re-export it with dynamo-export")
        if size > MAX_GRAPH_BYTES:
            raise GraphError(f"{path} is {size} bytes, more than a protobuf message can hold")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read_model(_Wire(buf, str(path)), size)
    except OSError as exc:
        raise GraphError(f"cannot read {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------- checks


def check_graph(root: str | os.PathLike, manifest: Manifest) -> GraphInfo:
    """Raise GraphError unless the artifact's graph is one this runtime may hand to ONNX Runtime."""
    root = Path(root)
    graph_file = root / manifest.graph.file
    info = read_graph(graph_file)
    problems = [
        f"{graph_file.name} contains {what}, which dynamo-export never emits" for what in info.unsupported
    ]
    problems += _contract_problems(manifest)
    problems += _domain_problems(info, manifest)
    problems += _io_problems(info, manifest)
    if problems:
        raise GraphError(f"{graph_file} is rejected: " + "; ".join(problems))
    data = _DataFile(root, manifest)
    for tensor in info.tensors:
        _check_tensor(tensor, data)
    return info


def _contract_problems(manifest: Manifest) -> list[str]:
    """The manifest's I/O must be the contract its model section implies (else wrong names get fed)."""
    model = manifest.model
    past = manifest.cache_names("past_key") + manifest.cache_names("past_value")
    present = manifest.cache_names("present_key") + manifest.cache_names("present_value")
    problems = []
    for kind, names, expected in (
        ("inputs", manifest.graph.inputs, ["input_ids", "attention_mask", "position_ids", *past]),
        ("outputs", manifest.graph.outputs, ["logits", *present]),
    ):
        if sorted(names) != sorted(expected):
            problems.append(
                f"the manifest's graph {kind} are not those of {model.num_cache_layers} cache layers "
                f"(missing {sorted(set(expected) - set(names))[:4]}, "
                f"unexpected {sorted(set(names) - set(expected))[:4]})"
            )
    logits = manifest.graph.outputs.get("logits")
    if logits is not None and (
        len(logits.axes) != 4 or logits.axes[1::2] != [model.num_token_heads, model.vocab_size]
    ):
        problems.append(
            f"logits axes {logits.axes} do not hold num_token_heads={model.num_token_heads} "
            f"and vocab_size={model.vocab_size}"
        )
    for name in past + present:
        spec = {**manifest.graph.inputs, **manifest.graph.outputs}.get(name)
        if spec is not None and (
            len(spec.axes) != 4 or spec.axes[1::2] != [model.num_attention_heads, model.head_dim]
        ):
            problems.append(f"{name} axes {spec.axes} do not hold the model's heads and head_dim")
            break
    return problems


def _domain_problems(info: GraphInfo, manifest: Manifest) -> list[str]:
    problems = []
    foreign = sorted((set(info.opsets) | set(info.node_domains)) - ALLOWED_DOMAINS)
    if foreign:
        problems.append(
            f"operator domains {foreign} are not among those dynamo-export emits {sorted(ALLOWED_DOMAINS)}"
        )
    unimported = sorted(set(info.node_domains) - set(info.opsets) - DEFAULT_DOMAINS)
    if unimported:
        problems.append(f"nodes use domains {unimported} that the model does not import")
    default = {info.opsets[d] for d in DEFAULT_DOMAINS if d in info.opsets}
    if default != {manifest.graph.opset}:
        problems.append(
            f"the default-domain opset is {sorted(default)}, the manifest says {manifest.graph.opset}"
        )
    return problems


def _io_problems(info: GraphInfo, manifest: Manifest) -> list[str]:
    problems = []
    for kind, found, expected in (
        ("inputs", info.inputs, manifest.graph.inputs),
        ("outputs", info.outputs, manifest.graph.outputs),
    ):
        by_name = {v.name: v for v in found}
        if len(by_name) != len(found) or set(by_name) != set(expected):
            missing, extra = sorted(set(expected) - set(by_name)), sorted(set(by_name) - set(expected))
            problems.append(f"graph {kind} differ from the manifest (missing {missing}, unexpected {extra})")
            continue
        for name, spec in expected.items():
            value = by_name[name]
            dtype = DATA_TYPES.get(value.elem_type, (f"type {value.elem_type}", 0))[0]
            if dtype != spec.dtype:
                problems.append(f"{name}: graph dtype {dtype}, manifest {spec.dtype}")
            if value.dims is None or len(value.dims) != len(spec.axes):
                problems.append(f"{name}: graph shape {value.dims}, manifest axes {spec.axes}")
            elif value.dims != list(spec.axes):
                problems.append(f"{name}: graph axes {value.dims} differ from the manifest's {spec.axes}")
    return problems


class _DataFile:
    """The one external-data file the manifest allows, checked once: a regular file inside the artifact."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.graph_dir = PurePosixPath(manifest.graph.file).parent
        self.expected = manifest.graph.external_data
        self._size: int | None = None

    def size_for(self, where: str, location: str) -> int:
        """Bytes in the file that `location` (relative to the graph file) names; GraphError unless allowed."""
        rel = _resolve_location(where, location, self.graph_dir)
        if self.expected is None:
            raise GraphError(
                f"{where} keeps its data in {location!r} but the manifest lists no external data file"
            )
        if rel != self.expected:
            raise GraphError(
                f"{where} keeps its data in {rel!r}; "
                f"the manifest's only external data file is {self.expected!r}"
            )
        if self._size is None:
            self._size = _plain_file_size(self.root, rel, where)
        return self._size


def _resolve_location(where: str, location: str, graph_dir: PurePosixPath) -> str:
    if ORT_MEMORY_MARKER in location:
        raise GraphError(
            f"{where} has the external-data location {location!r}: ONNX Runtime's in-memory address "
            "marker, which would make it read process memory. The artifact is malicious or corrupt"
        )
    pure = PurePosixPath(location)
    if not location or "\\" in location or "\x00" in location or pure.is_absolute() or ".." in pure.parts:
        raise GraphError(
            f"{where} has the external-data location {location!r}: only a plain relative path inside "
            "the artifact is allowed (no '..', no absolute path)"
        )
    return (graph_dir / pure).as_posix()


def _plain_file_size(root: Path, rel: str, where: str) -> int:
    path = root / rel
    try:
        info = os.lstat(path)
        resolved = path.resolve(strict=True)
        inside = root.resolve(strict=True) / rel
    except OSError as exc:
        raise GraphError(f"{where}: its external data file {rel!r} cannot be opened: {exc}") from exc
    if stat.S_ISLNK(info.st_mode) or resolved != inside:
        raise GraphError(f"{where}: the external data path {rel!r} goes through a symbolic link")
    if not stat.S_ISREG(info.st_mode):
        raise GraphError(f"{where}: the external data path {rel!r} is not a regular file")
    if info.st_nlink > 1:
        raise GraphError(f"{where}: the external data file {rel!r} has {info.st_nlink} hard links")
    return info.st_size


def _check_tensor(t: TensorInfo, data: _DataFile) -> None:
    if t.data_type not in DATA_TYPES:
        raise GraphError(f"{t.where}: unknown data type {t.data_type}")
    if len(t.dims) > MAX_RANK or any(d < 0 for d in t.dims):
        raise GraphError(f"{t.where}: dims {t.dims[:MAX_RANK]} must be at most {MAX_RANK} sizes >= 0")
    if t.segment:
        raise GraphError(f"{t.where}: segmented tensors are not supported")
    numel = 1
    for d in t.dims:
        numel *= d
    name, bits = DATA_TYPES[t.data_type]
    nbytes = (numel * bits + 7) // 8
    if t.external_location:
        _check_external(t, data, nbytes, name)
    elif t.external:
        raise GraphError(f"{t.where}: has external_data entries but data_location is not EXTERNAL")
    else:
        _check_inline(t, numel, nbytes, name)


def _check_external(t: TensorInfo, data: _DataFile, nbytes: int, dtype: str) -> None:
    if dtype == "string":
        raise GraphError(f"{t.where}: string tensors cannot keep their data externally")
    if t.raw_bytes is not None or t.typed:
        raise GraphError(f"{t.where}: has both external and inline data")
    unknown = sorted(set(t.external) - EXTERNAL_KEYS)
    if unknown or "location" not in t.external:
        raise GraphError(
            f"{t.where}: external_data needs a location and accepts only {sorted(EXTERNAL_KEYS)}"
        )
    offset, length = (_decimal(t, key) for key in ("offset", "length"))
    size = data.size_for(t.where, t.external["location"])
    if length is not None and length != nbytes:
        raise GraphError(f"{t.where}: external length {length} != {nbytes} bytes for {dtype} {t.dims}")
    start = offset or 0
    if start + nbytes > size:
        raise GraphError(
            f"{t.where}: bytes [{start}, {start + nbytes}) lie outside {t.external['location']!r} "
            f"({size} bytes): the data file is truncated or the graph is corrupt"
        )


def _decimal(t: TensorInfo, key: str) -> int | None:
    text = t.external.get(key)
    if text is None:
        return None
    if not (0 < len(text) <= 19 and text.isascii() and text.isdigit()):
        raise GraphError(f"{t.where}: external_data {key} {text!r} is not a non-negative decimal integer")
    return int(text)


def _check_inline(t: TensorInfo, numel: int, nbytes: int, dtype: str) -> None:
    if t.raw_bytes is not None and t.typed:
        raise GraphError(f"{t.where}: holds both raw_data and typed data")
    if t.raw_bytes is not None:
        if dtype == "string" or t.raw_bytes != nbytes:
            raise GraphError(f"{t.where}: raw_data has {t.raw_bytes} bytes; {dtype} {t.dims} needs {nbytes}")
        return
    if not t.typed:
        if numel:
            raise GraphError(f"{t.where}: declares {numel} elements of {dtype} but holds no data")
        return
    field_number, per_element = _TYPED_FIELD.get(t.data_type, (None, 0))
    if set(t.typed) != {field_number} or t.typed[field_number] != numel * per_element:
        raise GraphError(
            f"{t.where}: its typed data does not hold the {numel} {dtype} values dims {t.dims} declare"
        )
