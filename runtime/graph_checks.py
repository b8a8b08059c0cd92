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
  and `com.microsoft` (ORT's transformer fusions, `--optimize`, and int4's
  quantized operators); the default domain's opset is the manifest's;
- ONNX Runtime's quantized-weight operators, MatMulNBits and
  GatherBlockQuantized, appear only in a graph whose manifest says int4, in
  com.microsoft, and exactly as onnxruntime's MatMulNBitsQuantizer writes them
  (converters/optimize.py, quantize_int4): 4-bit blocks of a size ORT runs,
  weights, scales and zero points held in initializers whose dtypes and shapes
  are the ones the node's attributes imply, so a kernel never indexes past
  the bytes it was given;
- the graph's inputs and outputs are the manifest's: names, element types,
  ranks, named and fixed axes.

The graph is read by runtime/onnx_reader.py (a small protobuf reader: runtime/
may not depend on `onnx`), before ONNX Runtime sees it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from runtime.contract import INT4_BLOCK_SIZES, LOGITS, LOGITS_TO_KEEP, TOKEN_INPUTS
from runtime.errors import GraphError
from runtime.manifest import MAX_SIZE, Manifest
from runtime.onnx_reader import (
    DATA_TYPES,
    MAX_RANK,
    TYPED_FIELD,
    OnnxFile,
    OnnxNode,
    OnnxTensor,
    read_onnx,
    read_onnx_bytes,
)

MS_DOMAIN = "com.microsoft"
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", MS_DOMAIN})
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum"})
ORT_MEMORY_MARKER = "_ORT_MEM_ADDR_"
QUANTIZED_DTYPE = "int4"  # the manifest dtype whose graph holds the quantized-weight operators
MAX_LISTED = 5  # problems named per kind; the rest are counted


def check_graph(
    root: str | os.PathLike,
    manifest: Manifest,
    graph_bytes: bytes | None = None,
    data_size: int | None = None,
) -> OnnxFile:
    """Raise GraphError unless the artifact's graph is one this runtime may hand to ONNX Runtime.

    With `graph_bytes` (and `data_size`, the length of the external data file when the manifest
    lists one) the check reads no file: it judges the bytes the loader read once and will hand
    to ONNX Runtime (runtime/artifact_files.py), so no file swapped in between escapes it.
    """
    root = Path(root)
    graph_file = root / manifest.graph.file
    info = read_onnx(graph_file) if graph_bytes is None else read_onnx_bytes(graph_bytes, str(graph_file))
    problems = [
        f"{graph_file.name} contains {what}, which dynamo-export never emits" for what in info.unsupported
    ]
    problems += _contract_problems(manifest)
    problems += _domain_problems(info, manifest)
    problems += _quantized_problems(info, manifest)
    problems += _io_problems(info, manifest)
    if problems:
        raise GraphError(f"{graph_file} is rejected: " + "; ".join(problems))
    data = _DataFile(root, manifest, data_size)
    for tensor in info.tensors:
        _check_tensor(tensor, data)
    return info


def _contract_problems(manifest: Manifest) -> list[str]:
    """The manifest's I/O must be the contract its model section implies (else wrong names get fed)."""
    model = manifest.model
    past = manifest.cache_names("past_key") + manifest.cache_names("past_value")
    present = manifest.cache_names("present_key") + manifest.cache_names("present_value")
    problems = []
    # schema 1 graphs predate logits_to_keep (runtime/manifest.py)
    tokens = [n for n in TOKEN_INPUTS if n != LOGITS_TO_KEEP or manifest.schema_version >= 2]
    for kind, names, expected in (
        ("inputs", manifest.graph.inputs, [*tokens, *past]),
        ("outputs", manifest.graph.outputs, [LOGITS, *present]),
    ):
        if sorted(names) != sorted(expected):
            problems.append(
                f"the manifest's graph {kind} are not those of {model.num_cache_layers} cache layers "
                f"(missing {sorted(set(expected) - set(names))[:4]}, "
                f"unexpected {sorted(set(names) - set(expected))[:4]})"
            )
    logits = manifest.graph.outputs.get(LOGITS)
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


def _domain_problems(info: OnnxFile, manifest: Manifest) -> list[str]:
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


def _quantized_problems(info: OnnxFile, manifest: Manifest) -> list[str]:
    """MatMulNBits / GatherBlockQuantized: only in an int4 graph, only as the quantizer writes them."""
    checks = {"MatMulNBits": _matmul_nbits_problems, "GatherBlockQuantized": _gather_quantized_problems}
    problems = [
        f"operator {op} in domain {domain or 'ai.onnx'!r}: dynamo-export emits it only in {MS_DOMAIN!r}"
        for domain, op in sorted(info.op_types)
        if op in checks and domain != MS_DOMAIN
    ]
    nodes = [node for node in info.contrib_nodes if node.domain == MS_DOMAIN and node.op_type in checks]
    if nodes and manifest.graph.dtype != QUANTIZED_DTYPE:
        problems.append(
            f"{len(nodes)} quantized-weight nodes ({nodes[0].op_type}, ...) in a graph the manifest calls "
            f"{manifest.graph.dtype!r}: dynamo-export emits them only with --dtype {QUANTIZED_DTYPE}"
        )
        return problems
    found = []
    for node in nodes:
        where = f"node {node.name or node.op_type!r} ({node.op_type})"
        if node.repeated:
            found.append(f"{where} repeats the attributes {sorted(set(node.repeated))}")
            continue
        found += [f"{where} {problem}" for problem in checks[node.op_type](node, info)]
    if len(found) > MAX_LISTED:
        found = [*found[:MAX_LISTED], f"and {len(found) - MAX_LISTED} more quantized-node problems"]
    return problems + found


def _integer_attributes(node: OnnxNode, required: set[str], optional: set[str]) -> dict[str, int] | None:
    """The node's attributes when they are exactly `required` plus some of `optional`, all integers."""
    names = set(node.attributes)
    if not required <= names <= required | optional or any(v is None for v in node.attributes.values()):
        return None
    return {name: int(value) for name, value in node.attributes.items() if value is not None}


def _matmul_nbits_problems(node: OnnxNode, info: OnnxFile) -> list[str]:
    """A (.., K) x 4-bit B (K, N): B (N, blocks, block/2) uint8, scales (N, blocks), zero points (N, ceil(blocks/2))."""
    attrs = _integer_attributes(node, {"K", "N", "bits", "block_size"}, {"accuracy_level"})
    if attrs is None:
        return [
            f"has attributes {sorted(node.attributes)}; expected integers K, N, bits, block_size[, accuracy_level]"
        ]
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    if attrs["bits"] != 4 or block not in INT4_BLOCK_SIZES or not (0 < k <= MAX_SIZE and 0 < n <= MAX_SIZE):
        return [
            f"has bits {attrs['bits']}, block_size {block}, K {k}, N {n}; expected 4 bits in blocks of "
            f"{list(INT4_BLOCK_SIZES)} and sizes in [1, {MAX_SIZE}]"
        ]
    if attrs.get("accuracy_level", 0) not in range(5):
        return [f"has accuracy_level {attrs['accuracy_level']}; ONNX Runtime knows 0..4"]
    if len(node.inputs) not in (3, 4):
        return [f"has {len(node.inputs)} inputs; expected A, B, scales[, zero_points]"]
    blocks = -(-k // block)
    expected = [("B", "uint8", [n, blocks, block // 2]), ("scales", "float32", [n, blocks])]
    if len(node.inputs) == 4:
        expected.append(("zero_points", "uint8", [n, -(-blocks // 2)]))
    return _initializer_problems(node.inputs[1:], expected, info)


def _gather_quantized_problems(node: OnnxNode, info: OnnxFile) -> list[str]:
    """The token embedding (V, H) in 4-bit blocks along H: scales and zero points (V, blocks)."""
    attrs = _integer_attributes(node, {"gather_axis", "quantize_axis", "block_size"}, set())
    if attrs is None:
        return [
            f"has attributes {sorted(node.attributes)}; expected integers gather_axis, quantize_axis, block_size"
        ]
    if (attrs["gather_axis"], attrs["quantize_axis"]) != (0, 1) or attrs[
        "block_size"
    ] not in INT4_BLOCK_SIZES:
        return [
            f"has gather_axis {attrs['gather_axis']}, quantize_axis {attrs['quantize_axis']}, block_size "
            f"{attrs['block_size']}; expected rows gathered, blocks of {list(INT4_BLOCK_SIZES)} along the row"
        ]
    if len(node.inputs) not in (3, 4):
        return [f"has {len(node.inputs)} inputs; expected data, indices, scales[, zero_points]"]
    data = info.initializers.get(node.inputs[0])
    dtype = DATA_TYPES.get(data.data_type, ("?", 0))[0] if data is not None else None
    if data is None or len(data.dims) != 2 or dtype not in ("uint4", "int4"):
        return ["reads data that is not a 2-D uint4/int4 initializer"]
    if (dtype == "uint4") != (len(node.inputs) == 4):
        return [f"has {dtype} data {'without' if dtype == 'uint4' else 'with'} zero points"]
    rows, blocks = data.dims[0], -(-data.dims[1] // attrs["block_size"])
    expected = [("data", dtype, data.dims), ("scales", "float32", [rows, blocks])]
    if len(node.inputs) == 4:
        expected.append(("zero_points", "uint4", [rows, blocks]))
    return _initializer_problems([node.inputs[0], *node.inputs[2:]], expected, info)


def _initializer_problems(
    names: list[str], expected: list[tuple[str, str, list[int]]], info: OnnxFile
) -> list[str]:
    """Each of `names` an initializer, given once, of the (role, dtype, dims) expected of it."""
    problems = []
    for name, (role, dtype, dims) in zip(names, expected, strict=True):
        tensor = info.initializers.get(name)
        if tensor is None:
            problems.append(f"reads its {role} {name!r} from somewhere other than an initializer")
            continue
        if name in info.repeated_initializers:
            problems.append(f"reads its {role} {name!r}, a name the graph gives two initializers")
            continue
        found = DATA_TYPES.get(tensor.data_type, (f"type {tensor.data_type}", 0))[0]
        if found != dtype or tensor.dims != dims:
            problems.append(
                f"has {role} {name!r} of {found} {tensor.dims}; its attributes imply {dtype} {dims}"
            )
    return problems


def _io_problems(info: OnnxFile, manifest: Manifest) -> list[str]:
    problems = []
    for kind, found, expected in (
        ("inputs", info.inputs, manifest.graph.inputs),
        ("outputs", info.outputs, manifest.graph.outputs),
    ):
        in_graph = dict(found)
        if len(in_graph) != len(found) or set(in_graph) != set(expected):
            missing, extra = sorted(set(expected) - set(in_graph)), sorted(set(in_graph) - set(expected))
            problems.append(f"graph {kind} differ from the manifest (missing {missing}, unexpected {extra})")
            continue
        for name, spec in expected.items():
            graph = in_graph[name]
            if graph is None:
                problems.append(f"{name}: the graph gives it no tensor shape, manifest axes {spec.axes}")
                continue
            if graph.dtype != spec.dtype:
                problems.append(f"{name}: graph dtype {graph.dtype}, manifest {spec.dtype}")
            if len(graph.axes) != len(spec.axes):
                problems.append(f"{name}: graph shape {graph.axes}, manifest axes {spec.axes}")
            elif graph.axes != list(spec.axes):
                problems.append(f"{name}: graph axes {graph.axes} differ from the manifest's {spec.axes}")
    return problems


class _DataFile:
    """The one external-data file the manifest allows, checked once: a regular file inside the artifact."""

    def __init__(self, root: Path, manifest: Manifest, size: int | None = None):
        self.root = root
        self.graph_dir = PurePosixPath(manifest.graph.file).parent
        self.expected = manifest.graph.external_data
        self._size = size  # known when the loader read the file already; else looked up once

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


def _check_tensor(t: OnnxTensor, data: _DataFile) -> None:
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


def _check_external(t: OnnxTensor, data: _DataFile, nbytes: int, dtype: str) -> None:
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


def _decimal(t: OnnxTensor, key: str) -> int | None:
    text = t.external.get(key)
    if text is None:
        return None
    if not (0 < len(text) <= 19 and text.isascii() and text.isdigit()):
        raise GraphError(f"{t.where}: external_data {key} {text!r} is not a non-negative decimal integer")
    return int(text)


def _check_inline(t: OnnxTensor, numel: int, nbytes: int, dtype: str) -> None:
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
    field_number, per_element = TYPED_FIELD.get(t.data_type, (None, 0))
    if set(t.typed) != {field_number} or t.typed[field_number] != numel * per_element:
        raise GraphError(
            f"{t.where}: its typed data does not hold the {numel} {dtype} values dims {t.dims} declare"
        )


def external_locations(info: OnnxFile) -> list[str]:
    """The external-data locations the graph's tensors name, as written: after `check_graph` every
    one of them is a spelling of the manifest's one data file, and ONNX Runtime, given the graph as
    bytes, looks each up by exactly this string among the files handed to it in memory."""
    return sorted({t.external["location"] for t in info.tensors if t.external_location})
