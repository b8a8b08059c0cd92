"""One ONNX Runtime session over an artifact's graph, and the per-stream KV cache.

The graph's I/O contract comes from the manifest (runtime/manifest.py). The
cache stays where the provider computes: numpy arrays on CPU (ORT reads them in
place, and the presents it returns become the next pass's pasts without a copy)
and device-resident OrtValues on CUDA through IO binding, so only the logits
cross to the host.

Rejected verify drafts are not cut out of the cache; their slots are masked out
through `attention_mask` instead. That keeps one code path for both providers
and never copies or reallocates a cache: the masked slots add exp(min) = 0 to
the softmax, so the result is that of a trimmed cache.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from runtime.contract import (
    ATTENTION_MASK,
    CUDA_PROVIDER,
    INPUT_IDS,
    LOGITS,
    LOGITS_TO_KEEP,
    ORT_PROVIDERS,
    ORT_TYPES,
    POSITION_IDS,
    PROVIDERS,
    interleaved,
)
from runtime.errors import (
    ArtifactError,
    GenerationTimeout,
    GraphError,
    InferenceError,
    InputError,
    ProviderError,
)
from runtime.manifest import Manifest


def resolve_provider(provider: str) -> str:
    """'cpu' | 'cuda'; 'auto' picks CUDA when this onnxruntime build has it."""
    if provider not in PROVIDERS:
        raise ProviderError(f"provider={provider!r} is not one of {list(PROVIDERS)}")
    available = ort.get_available_providers()
    has_cuda = CUDA_PROVIDER in available
    if provider == "auto":
        return "cuda" if has_cuda else "cpu"
    if provider == "cuda" and not has_cuda:
        raise ProviderError(
            "provider='cuda' needs the CUDA execution provider, but this onnxruntime build only has "
            f"{available}. Fix: pip uninstall -y onnxruntime && pip install 'dynamo-export[gpu]' "
            "(onnxruntime-gpu), or pass provider='cpu' / 'auto'."
        )
    return provider


@dataclass
class KVCache:
    """One generation stream's cache: per layer (key, value), plus which slots are live."""

    keys: list
    values: list
    live: bytearray = field(default_factory=bytearray)  # 1 = a real token, 0 = a rejected draft's slot

    @property
    def slots(self) -> int:
        return len(self.live)


class GraphSession:
    """Runs forward passes of one artifact; thread-safe (ORT sessions are), state lives in KVCache."""

    def __init__(
        self,
        model_path: str | bytes,
        manifest: Manifest,
        provider: str = "cpu",
        threads: int | None = None,
        io_binding: bool | None = None,
        external_data: Mapping[str, bytes] | None = None,
    ):
        """`model_path` is the graph's path, or its bytes as the loader read and checked them
        (runtime/artifact_files.py); then `external_data` maps each external-data location the
        graph names to the data file's bytes, so ONNX Runtime opens no file at all.

        `io_binding` (default: on for CUDA only) keeps the cache in ORT's own device buffers,
        bound to the next pass; on the CPU provider it runs CUDA's code path, which the tests
        hold equal to the plain one on machines without a GPU."""
        self.manifest = manifest
        self.provider = resolve_provider(provider)
        self.io_binding = self.provider == "cuda" if io_binding is None else bool(io_binding)
        self._device = "cuda" if self.provider == "cuda" else "cpu"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            limit = MAX_THREADS_PER_CPU * (os.cpu_count() or 1)
            if (
                isinstance(threads, bool)
                or not isinstance(threads, (int, np.integer))
                or not 1 <= threads <= limit
            ):
                raise ProviderError(
                    f"threads={str(threads)[:40]} must be an integer in 1..{limit} ({MAX_THREADS_PER_CPU} per CPU "
                    "here), or None for ONNX Runtime's default"
                )
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        name = model_path if isinstance(model_path, str) else manifest.graph.file
        try:
            if external_data:  # ORT copies what it needs while it builds the session
                buffers = list(external_data.values())
                options.add_external_initializers_from_files_in_memory(
                    list(external_data), buffers, [len(b) for b in buffers]
                )
            self.session = ort.InferenceSession(
                model_path, sess_options=options, providers=ORT_PROVIDERS[self.provider]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ArtifactError(f"ONNX Runtime could not load {name}: {exc}") from exc
        self._check_io()
        # (key, value) names per layer to feed, and the presents interleaved as the graph returns them.
        self.past_names = list(
            zip(manifest.cache_names("past_key"), manifest.cache_names("past_value"), strict=True)
        )
        graph, layers = manifest.graph, manifest.model.num_cache_layers
        self.present_names = interleaved(graph.present_key, graph.present_value, layers)
        self.cache_dtype = np.dtype(manifest.graph.cache_dtype)
        self.logits_dtype = np.dtype(manifest.graph.logits_dtype)
        self._device_id = 0
        # schema 1 graphs return every fed position's logits; last_only then slices on the CPU
        self.keeps_logits = LOGITS_TO_KEEP in manifest.graph.inputs

    def _check_io(self) -> None:
        """The graph's inputs/outputs must be exactly the manifest's, with the same dtypes."""
        graph = self.manifest.graph
        actual_in = {i.name: ORT_TYPES.get(i.type, i.type) for i in self.session.get_inputs()}
        actual_out = {o.name: ORT_TYPES.get(o.type, o.type) for o in self.session.get_outputs()}
        expected_in = {name: spec.dtype for name, spec in graph.inputs.items()}
        expected_out = {name: spec.dtype for name, spec in graph.outputs.items()}
        problems = []
        for kind, actual, expected in (
            ("inputs", actual_in, expected_in),
            ("outputs", actual_out, expected_out),
        ):
            if set(actual) != set(expected):
                problems.append(
                    f"graph {kind} {sorted(set(actual) ^ set(expected))} differ between model.onnx and the manifest"
                )
            bad = sorted(
                f"{n}: graph {actual[n]} vs manifest {expected[n]}"
                for n in set(actual) & set(expected)
                if actual[n] != expected[n]
            )
            if bad:
                problems.append(f"{kind} dtypes differ: {bad}")
        logits = next((o for o in self.session.get_outputs() if o.name == LOGITS), None)
        if (
            logits is not None
            and isinstance(logits.shape[-1], int)
            and logits.shape[-1] != self.manifest.model.vocab_size
        ):
            problems.append(
                f"logits width {logits.shape[-1]} != manifest vocab_size {self.manifest.model.vocab_size}"
            )
        if problems:
            raise ArtifactError("the graph does not match its manifest: " + "; ".join(problems))

    def empty_cache(self) -> KVCache:
        m = self.manifest.model
        shape = (1, m.num_attention_heads, 0, m.head_dim)
        layers = m.num_cache_layers
        keys = [np.zeros(shape, self.cache_dtype) for _ in range(layers)]
        values = [np.zeros(shape, self.cache_dtype) for _ in range(layers)]
        if self.io_binding:
            keys = [self._to_device(k) for k in keys]
            values = [self._to_device(v) for v in values]
        return KVCache(keys, values, bytearray())

    def compact(self, cache: KVCache) -> None:
        """Drop the slots of rejected drafts from `cache`, one copy of the live ones per tensor.

        Masked slots cost every later pass their share of the cache concatenation and the
        attention, and verify leaves about one per pass; the decoding loop calls this once they
        are a fixed share of the cache (runtime/generation.py). A cache held in ORT's device
        buffers (IO binding) keeps its masked slots: gathering there would need a graph of its own.
        """
        if self.io_binding or all(cache.live):
            return
        keep = np.flatnonzero(np.frombuffer(bytes(cache.live), dtype=np.uint8))
        cache.keys[:] = [np.take(key, keep, axis=2) for key in cache.keys]
        cache.values[:] = [np.take(value, keep, axis=2) for value in cache.values]
        cache.live[:] = b"\x01" * keep.size

    def _to_device(self, array: np.ndarray):
        return ort.OrtValue.ortvalue_from_numpy(array, self._device, self._device_id)

    def forward(
        self,
        cache: KVCache,
        tokens: list[int],
        positions: list[int],
        run_options: ort.RunOptions | None = None,
        last_only: bool = False,
    ) -> np.ndarray:
        """Feed `tokens` at `positions`; returns logits (n_heads, rows, vocab) and grows `cache`.

        rows are every fed position, or with `last_only` the last one alone: then the graph
        unembeds one row per head instead of len(tokens) (`ar`, `dynamic` and every prefill
        sample there only).
        """
        input_ids = np.asarray([tokens], dtype=np.int64)  # (1, T)
        position_ids = np.asarray([positions], dtype=np.int64)  # (1, T)
        start = len(tokens) - 1 if last_only else 0
        keep = np.arange(start, len(tokens), dtype=np.int64)
        # One C-level conversion per pass instead of unpacking a Python list as long as the context.
        live = np.frombuffer(bytes(cache.live) + b"\x01" * len(tokens), dtype=np.uint8)
        attention_mask = live.astype(np.int64)[None]  # (1, past+T)
        try:
            tokens_in = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: position_ids}
            if self.keeps_logits:
                tokens_in[LOGITS_TO_KEEP] = keep
            if self.io_binding:
                outputs = self._forward_bound(cache, tokens_in, run_options)
            else:
                outputs = self._forward_cpu(cache, tokens_in, run_options)
        except Exception as exc:  # ORT raises its own Fail / RuntimeException / allocation errors
            if run_options is not None and run_options.terminate:
                raise GenerationTimeout("generation ran past its time limit and was stopped") from exc
            raise InferenceError(
                f"ONNX Runtime failed in a forward pass ({type(exc).__name__}): {exc}"
            ) from exc
        logits = outputs[0]
        rows = keep.size if self.keeps_logits else len(tokens)
        self._check_outputs(logits, outputs[1:], len(tokens), rows, cache.slots)
        cache.keys[:] = outputs[1::2]
        cache.values[:] = outputs[2::2]
        cache.live.extend(b"\x01" * len(tokens))
        return logits[0] if self.keeps_logits else logits[0, :, start:]  # (n_heads, rows, V)

    def _check_outputs(self, logits: np.ndarray, presents: list, fed: int, rows: int, past: int) -> None:
        """Every pass's outputs against the manifest, before the sampler or the cache sees them: a
        graph that lies about its heads, vocabulary, dtypes or cache growth is refused here, in every
        mode, instead of turning into a huge grid, a silent `ar`, or a bare numpy error later."""
        model = self.manifest.model
        problems = []
        expected = (1, model.num_token_heads, rows, model.vocab_size)
        if logits.shape != expected or logits.dtype != self.logits_dtype:
            problems.append(
                f"logits {logits.dtype}{list(logits.shape)}, expected {self.logits_dtype}{list(expected)}"
            )
        grown = [1, model.num_attention_heads, past + fed, model.head_dim]
        if len(presents) != len(self.present_names):  # only a wrapped or patched session can do this
            problems.append(f"{len(presents)} cache outputs, expected {len(self.present_names)}")
        for name, present in zip(self.present_names, presents, strict=False):
            shape, dtype = _shape_and_dtype(present)
            if shape != grown or dtype != self.cache_dtype:
                problems.append(f"{name} {dtype}{shape}, expected {self.cache_dtype}{grown}")
                break
        if problems:
            raise GraphError(
                "the graph's outputs break its manifest (a tampered or mismatched artifact): "
                + "; ".join(problems)
            )

    def _forward_cpu(self, cache, tokens_in: dict, run_options) -> list:
        feed = dict(tokens_in)
        for (key_name, value_name), key, value in zip(self.past_names, cache.keys, cache.values, strict=True):
            feed[key_name] = key
            feed[value_name] = value
        return self.session.run([LOGITS, *self.present_names], feed, run_options)

    def _forward_bound(self, cache, tokens_in: dict, run_options):
        binding = self.session.io_binding()
        for name, array in tokens_in.items():
            binding.bind_ortvalue_input(name, self._to_device(array))
        for (key_name, value_name), key, value in zip(self.past_names, cache.keys, cache.values, strict=True):
            binding.bind_ortvalue_input(key_name, key)
            binding.bind_ortvalue_input(value_name, value)
        binding.bind_output(LOGITS, "cpu")
        for name in self.present_names:
            binding.bind_output(name, self._device, self._device_id)
        self.session.run_with_iobinding(binding, run_options)
        outputs = binding.get_outputs()
        return [outputs[0].numpy(), *outputs[1:]]


def _shape_and_dtype(value) -> tuple[list[int], np.dtype | str]:
    """A numpy array's or an OrtValue's (device-resident, IO binding) shape and dtype."""
    if isinstance(value, (np.ndarray, np.generic)):  # a 0-d result may come back as a numpy scalar
        return list(value.shape), value.dtype
    name = ORT_TYPES.get(value.data_type())
    return list(value.shape()), np.dtype(name) if name else value.data_type()


# More intra-op threads than this per CPU only contend for the same cores.
MAX_THREADS_PER_CPU = 4


class Deadline:
    """A per-call time limit: checked between passes, and a timer sets RunOptions.terminate
    so that a forward pass still running when the limit passes is stopped inside ONNX Runtime.

    The between-pass check reads the clock itself: the timer thread needs the GIL to fire,
    which a fast loop may not give it before the next check.
    """

    def __init__(self, seconds: float | None):
        self.run_options = ort.RunOptions()
        self._timer = None
        self._ends_at = math.inf
        if seconds is not None:
            number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
            if not number or not 0 < seconds < math.inf:
                raise InputError(f"time_limit_s={seconds!r} must be a finite number of seconds > 0, or None")
            self._ends_at = time.monotonic() + seconds
            self._timer = threading.Timer(seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        self.run_options.terminate = True

    @property
    def expired(self) -> bool:
        return bool(self.run_options.terminate) or time.monotonic() >= self._ends_at

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
