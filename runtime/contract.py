"""The graph's contract, spelled once: I/O names, cache layout, dtypes and execution providers.

The exporter (converters/io_spec.py builds its spec from `graph_io`), the artifact's
manifest (runtime/manifest.py), the checks of a graph from a stranger
(runtime/graph_checks.py), the runtime's session (runtime/session.py), the CLIs and
the parity check (converters/verify.py) must agree on these, so they live here and
nowhere else. Torch-free: the runtime reads it as much as the exporter.

    input_ids                    int64  (batch, seq)
    attention_mask               int64  (batch, past + seq)
    position_ids                 int64  (batch, seq)
    logits_to_keep               int64  (kept,)        which fed positions get logits, 0 <= p < seq
    past_key_values.{i}.key      float  (batch, num_heads, past, head_dim)   i = 0 .. num_cache_layers-1
    past_key_values.{i}.value    float  (batch, num_heads, past, head_dim)
    ->
    logits                       float  (batch, n_heads, kept, vocab)
    present.{i}.key / .value     float  (batch, num_heads, past + seq, head_dim)

Cache layout: one (key, value) pair per decoder layer that attends, ordered stem
layers 0..L-2, head 1's layer (the base model's last), then the extra heads'
layers, so num_cache_layers = L + n - 1. The graph takes and returns them
interleaved (layer 0 key, layer 0 value, layer 1 key, ...) after the three token
inputs and after the logits. A graph input or output is described by a
`TensorSpec` (its dtype and axes), keyed by its name.

`logits_to_keep` (transformers' name; a 1-D tensor there too means "these positions")
exists because most passes need one row: `ar` and `dynamic` sample at the last fed
position, and every prefill too, while the unembedding of every head at every fed
position is the largest MatMul of a small model's pass (n x seq rows of a vocab x
hidden matrix). Graphs exported before it (manifest schema 1) lack the input and
return every position; the session slices those on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

# -- names --------------------------------------------------------------------------------------------

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS_TO_KEEP = "logits_to_keep"
TOKEN_INPUTS = (
    INPUT_IDS,
    ATTENTION_MASK,
    POSITION_IDS,
    LOGITS_TO_KEEP,
)  # the graph inputs ahead of the cache
LOGITS = "logits"

# Cache name patterns (optimum's). A manifest records the patterns its graph uses; these are the defaults.
PAST_KEY = "past_key_values.{i}.key"
PAST_VALUE = "past_key_values.{i}.value"
PRESENT_KEY = "present.{i}.key"
PRESENT_VALUE = "present.{i}.value"

# Named dynamic axes. optimum spells the sum out too: the attention mask and the presents have it.
BATCH = "batch"
SEQ = "seq"
PAST = "past"
TOTAL = "past + seq"
KEPT = "kept"  # rows of logits a pass asks for (logits_to_keep's length)

# -- dtypes -------------------------------------------------------------------------------------------

WEIGHT_DTYPES = ("fp32", "fp16", "int8", "int4")  # how the weights are stored (dynamo-export --dtype)
FLOAT_DTYPES = ("float32", "float16")  # the cache and the logits
TENSOR_DTYPES = ("int64", *FLOAT_DTYPES)  # any graph input or output (ONNX-style names, as numpy spells them)
# The cache's dtype for each weight dtype: int8 and int4 quantize weights only, activations stay float32.
CACHE_DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "float32", "int4": "float32"}
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
# int4's weight blocks (dynamo-export --int4-block-size): the powers of two that ONNX Runtime's MatMulNBits and
# GatherBlockQuantized kernels take, 16..256 weights along the input axis per scale.
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)

# -- execution providers ------------------------------------------------------------------------------

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
DEVICES = ("cpu", "cuda")
PROVIDERS = (*DEVICES, "auto")  # what callers may ask for; 'auto' is CUDA when this onnxruntime has it
ORT_PROVIDERS = {"cpu": [CPU_PROVIDER], "cuda": [CUDA_PROVIDER, CPU_PROVIDER]}  # device -> ORT's list


# -- the I/O spec -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: dtype an ONNX-style name ('int64', 'float32', 'float16'), axes a named
    dynamic axis or a fixed size each."""

    dtype: str
    axes: list

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape for the axis sizes in `sizes` ({'batch': 2, 'seq': 3, 'past': 5}; TOTAL derived,
        KEPT = seq unless given)."""
        sizes = {KEPT: sizes[SEQ], **sizes, TOTAL: sizes[PAST] + sizes[SEQ]}
        return tuple(a if isinstance(a, int) else sizes[a] for a in self.axes)


def cache_layer_count(num_hidden_layers: int, num_token_heads: int) -> int:
    """Layers with a KV cache: the base model's L (stem + head 1's layer) plus one per extra head."""
    return num_hidden_layers + num_token_heads - 1


def cache_names(pattern: str, layers: int) -> list[str]:
    """One cache name pattern ('past_key_values.{i}.key', ...) for layers 0 .. layers-1."""
    return [pattern.format(i=i) for i in range(layers)]


def interleaved(key_pattern: str, value_pattern: str, layers: int) -> list[str]:
    """Cache names in the order the graph takes or returns them: layer 0 key, layer 0 value, layer 1 key, ..."""
    keys, values = cache_names(key_pattern, layers), cache_names(value_pattern, layers)
    return [name for pair in zip(keys, values, strict=True) for name in pair]


def graph_io(
    *,
    num_cache_layers: int,
    num_token_heads: int,
    num_attention_heads: int,
    head_dim: int,
    vocab_size: int,
    cache_dtype: str = "float32",
    logits_dtype: str = "float32",
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """(inputs, outputs), each name -> TensorSpec in the graph's order (the table above)."""

    def cache(past: str) -> TensorSpec:
        return TensorSpec(cache_dtype, [BATCH, num_attention_heads, past, head_dim])

    inputs = {
        INPUT_IDS: TensorSpec("int64", [BATCH, SEQ]),
        ATTENTION_MASK: TensorSpec("int64", [BATCH, TOTAL]),
        POSITION_IDS: TensorSpec("int64", [BATCH, SEQ]),
        LOGITS_TO_KEEP: TensorSpec("int64", [KEPT]),
        **{name: cache(PAST) for name in interleaved(PAST_KEY, PAST_VALUE, num_cache_layers)},
    }
    outputs = {
        LOGITS: TensorSpec(logits_dtype, [BATCH, num_token_heads, KEPT, vocab_size]),
        **{name: cache(TOTAL) for name in interleaved(PRESENT_KEY, PRESENT_VALUE, num_cache_layers)},
    }
    return inputs, outputs
