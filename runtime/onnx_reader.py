"""A read-only reader of the ONNX protobuf fields that the graph checks need (runtime/graph_checks.py).

Why a hand-written reader: runtime/ may import only numpy, scipy, onnxruntime,
tokenizers and the standard library (applications embed it without the export
tool chain), the `onnx` package is not among them, and onnxruntime offers no way
to look at a model without building a session, which is exactly when a tensor's
external data is read. The ONNX protobuf wire format is small and stable: this
module decodes only the fields it needs (field numbers from onnx/onnx.proto,
ONNX 1.23), read-only, from a memory map, and checks every length against the
bytes that remain before it looks at them, so a hostile file costs at most one
pass over its own bytes. Fields it does not need are skipped by their wire type;
tests compare what it reads with the `onnx` package on real exports.

What it reads (`read_onnx` -> `OnnxFile`): the opset imports, every node's domain
and op type (subgraphs included), every tensor (initializers, tensors inside node
attributes, subgraphs) as an `OnnxTensor` whose typed values are counted, not
decoded, the main graph's inputs and outputs in the contract's own terms
(name -> runtime.contract.TensorSpec), and the nodes outside the default domain
(ONNX Runtime's contrib operators) with their inputs and integer attributes as
`OnnxNode`s, so that the checks can hold a quantized operator's attributes
against the initializers it reads. What the exporter never emits (sparse
tensors, subgraphs, model-local functions, training info, graph inputs or outputs
without a tensor shape) is listed in `OnnxFile.unsupported` for the checks to refuse.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from runtime.contract import TensorSpec
from runtime.errors import GraphError

MAX_GRAPH_BYTES = 2**31 - 1  # protobuf cannot encode a larger message
MAX_SUBGRAPH_DEPTH = 8
MAX_RANK = 64

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
_ATTRIBUTE_INT = 2  # AttributeProto.AttributeType.INT: ONNX Runtime reads `i` only from such an attribute
# TensorProto typed-data fields: field number -> (wire type of one packed element, values per element).
_FLOAT_DATA, _INT32_DATA, _STRING_DATA, _INT64_DATA, _DOUBLE_DATA, _UINT64_DATA = 4, 5, 6, 7, 10, 11
TYPED_FIELD = {  # which typed field holds each data type, and how many entries one element takes
    1: (_FLOAT_DATA, 1), 14: (_FLOAT_DATA, 2), 11: (_DOUBLE_DATA, 1), 15: (_DOUBLE_DATA, 2),
    7: (_INT64_DATA, 1), 12: (_UINT64_DATA, 1), 13: (_UINT64_DATA, 1), 8: (_STRING_DATA, 1),
    **{t: (_INT32_DATA, 1) for t in (2, 3, 4, 5, 6, 9, 10, 16, 17, 18, 19, 20, 24)},
}  # fmt: skip


@dataclass
class OnnxTensor:
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
class OnnxNode:
    """A node outside the default ONNX domain: what the checks read of it."""

    name: str
    domain: str
    op_type: str
    inputs: list[str]
    attributes: dict[str, int | None]  # an INT attribute's value; None for an attribute of any other kind
    repeated: list[str]  # names of attributes that appear more than once


@dataclass
class OnnxFile:
    """The parts of a ModelProto the checks read (`read_onnx`)."""

    opsets: dict[str, int] = field(default_factory=dict)
    node_domains: dict[str, int] = field(default_factory=dict)  # domain -> node count (all graphs)
    op_types: set[tuple[str, str]] = field(default_factory=set)  # (domain, op_type)
    tensors: list[OnnxTensor] = field(default_factory=list)
    initializers: dict[str, OnnxTensor] = field(default_factory=dict)  # the main graph's, by name (the first)
    repeated_initializers: set[str] = field(default_factory=set)  # main-graph initializer names given twice
    contrib_nodes: list[OnnxNode] = field(default_factory=list)  # nodes outside the default domain
    # The main graph's inputs and outputs in the file's order, repeats kept: (name, TensorSpec), its dtype
    # named as in DATA_TYPES ("type N" when unknown), an axis an int, a name or None (unknown); or
    # (name, None) when the file gives it no tensor shape.
    inputs: list[tuple[str, TensorSpec | None]] = field(default_factory=list)
    outputs: list[tuple[str, TensorSpec | None]] = field(default_factory=list)
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


def _read_tensor(w: _Wire, start: int, end: int, where: str) -> OnnxTensor:
    t = OnnxTensor(where=where)
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


def _read_value_info(w: _Wire, start: int, end: int) -> tuple[str, TensorSpec | None]:
    """A ValueInfoProto: elem_type 0 when it is not a tensor."""
    name, elem_type, dims = "", 0, None
    for number, wire, value, stop in w.fields(start, end):
        if number == 1 and wire == _LEN:
            name = w.text(value, stop)
        elif number == 2 and wire == _LEN:  # TypeProto
            for t_number, t_wire, t_value, t_stop in w.fields(value, stop):
                if t_number == 1 and t_wire == _LEN:  # tensor_type
                    elem_type, dims = _read_tensor_type(w, t_value, t_stop, name)
    if dims is None:
        return name, None
    return name, TensorSpec(DATA_TYPES.get(elem_type, (f"type {elem_type}", 0))[0], dims)


def _read_tensor_type(w: _Wire, start: int, end: int, name: str) -> tuple[int, list | None]:
    """(elem_type, dims or None when no shape is given) of a TypeProto.Tensor."""
    elem_type, dims = 0, None
    for number, wire, value, stop in w.fields(start, end):
        if number == 1 and wire == _VARINT:
            elem_type = value
        elif number == 2 and wire == _LEN:  # TensorShapeProto
            dims = []
            for d_number, d_wire, d_value, d_stop in w.fields(value, stop):
                if d_number == 1 and d_wire == _LEN:
                    if len(dims) >= MAX_RANK:
                        raise GraphError(f"{w.path}: {name!r} has more than {MAX_RANK} dimensions")
                    dims.append(_read_dimension(w, d_value, d_stop))
    return elem_type, dims


def _read_dimension(w: _Wire, start: int, end: int) -> int | str | None:
    dim = None
    for number, wire, value, stop in w.fields(start, end):
        if number == 1 and wire == _VARINT:
            dim = _signed(value)
        elif number == 2 and wire == _LEN:
            dim = w.text(value, stop)
    return dim


def _read_graph(w: _Wire, start: int, end: int, info: OnnxFile, depth: int, label: str) -> None:
    if depth > MAX_SUBGRAPH_DEPTH:
        raise GraphError(f"{w.path}: subgraphs nest deeper than {MAX_SUBGRAPH_DEPTH} levels")
    for number, wire, value, stop in w.fields(start, end):
        if wire != _LEN:
            continue
        if number == 1:
            _read_node(w, value, stop, info, depth)
        elif number == 5:
            tensor = _read_tensor(w, value, stop, f"{label}initializer")
            info.tensors.append(tensor)
            if depth == 0 and tensor.name in info.initializers:
                info.repeated_initializers.add(tensor.name)
            elif depth == 0:
                info.initializers[tensor.name] = tensor
        elif number == 15:
            info.unsupported.append(f"a sparse initializer in {label or 'the main graph'}")
        elif number == 11 and depth == 0:
            info.inputs.append(_read_value_info(w, value, stop))
        elif number == 12 and depth == 0:
            info.outputs.append(_read_value_info(w, value, stop))


def _read_node(w: _Wire, start: int, end: int, info: OnnxFile, depth: int) -> None:
    domain, op_type, name, inputs, attributes = "", "", "", [], []
    for number, wire, value, stop in w.fields(start, end):
        if wire != _LEN:
            continue
        if number == 7:
            domain = w.text(value, stop)
        elif number == 4:
            op_type = w.text(value, stop)
        elif number == 3:
            name = w.text(value, stop)
        elif number == 1:
            inputs.append((value, stop))
        elif number == 5:
            attributes.append((value, stop))
    info.node_domains[domain] = info.node_domains.get(domain, 0) + 1
    info.op_types.add((domain, op_type))
    values: dict[str, int | None] = {}
    repeated = []
    for a_start, a_stop in attributes:
        key, number = _read_attribute(w, a_start, a_stop, info, depth, f"node {name or op_type!r}")
        if key in values:
            repeated.append(key)
        values[key] = number
    if domain not in ("", "ai.onnx"):
        names = [w.text(i_start, i_stop) for i_start, i_stop in inputs]
        info.contrib_nodes.append(OnnxNode(name, domain, op_type, names, values, repeated))


def _read_attribute(
    w: _Wire, start: int, end: int, info: OnnxFile, depth: int, node: str
) -> tuple[str, int | None]:
    """(name, value of an INT attribute or None); tensors and subgraphs inside go into `info`."""
    name, number_value, kind, tensors, graphs = "", None, 0, [], []
    for number, wire, value, stop in w.fields(start, end):
        if number == 3 and wire == _VARINT:  # i
            number_value = _signed(value)
        elif number == 20 and wire == _VARINT:  # type: AttributeProto.AttributeType
            kind = value
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
    return name, number_value if kind == _ATTRIBUTE_INT else None


def _read_model(w: _Wire, size: int) -> OnnxFile:
    info = OnnxFile()
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


def read_onnx(path: str | os.PathLike) -> OnnxFile:
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


def read_onnx_bytes(data: bytes, name: str) -> OnnxFile:
    """`read_onnx` over bytes already read (runtime/artifact_files.py): the checks and ONNX Runtime
    then see the same bytes, whatever happens to the file meanwhile. `name` appears in messages."""
    if not data:
        raise GraphError(f"{name} is empty; re-export it with dynamo-export")
    if len(data) > MAX_GRAPH_BYTES:
        raise GraphError(f"{name} is {len(data)} bytes, more than a protobuf message can hold")
    return _read_model(_Wire(data, name), len(data))
