"""How export and decoding scale with model size, against this machine's memory-bandwidth limit.

For each Pythia architecture (random weights: speed does not depend on their
values) the base model (one head) and its DynaMo-T3 conversion are exported
with verify=False, then timed for one decoding step with 128 past tokens in
the cache, feeding 1 new token (an `ar` step) and 3 (a DynaMo step emitting
three tokens, or verify's check of two drafts).

The bound. A decoding step of a small batch is memory-bound: every weight
matrix is streamed from memory once per step. Its floor is therefore
weight bytes read per step / memory bandwidth. "Weight bytes read" is every
parameter except the input embedding, of which a step only gathers k rows.
The bandwidth is measured with a numpy copy of a buffer far larger than the
caches, counting bytes read + bytes written (STREAM's "copy" convention), on
the calling thread, best of several, right before each row's step timing (the
machine is shared, so its bandwidth drifts). It is the bound for a
single-threaded run. ratio = measured step time / bound: 1.0 means the step
runs at copy bandwidth. A ratio a little below 1 is possible: a copy also pays
write-allocate traffic that the copy convention does not count, while a
decoding step mostly reads.

Sizes whose export would not fit are skipped, not attempted: exporting holds
the PyTorch model, the exported program and the ONNX protobuf at once, which
we estimate as EXPORT_MEMORY_FACTOR x the fp32 weight bytes.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from converters.artifact import export_artifact
from dynamo_bench.errors import BenchError
from dynamo_bench.sizes import PYTHIA, PYTHIA_CONTEXT, PYTHIA_VOCAB
from dynamo_export.modeling import DynaMoForCausalLM
from runtime import DynaMoRuntime
from runtime.session import KVCache

PAST = 128
NEW_TOKENS = (1, 3)
# Peak RSS of an export over the fp32 weight bytes, measured with export_artifact(verify=False):
# torch model + exported program + ONNX protobuf + its serialisation, with headroom.
EXPORT_MEMORY_FACTOR = 5.0
BANDWIDTH_BYTES = 256 * 2**20


def pythia_config(name: str, vocab_size: int = PYTHIA_VOCAB) -> GPTNeoXConfig:
    if name not in PYTHIA:
        raise BenchError(f"--scale-sizes: unknown size {name!r}; choose from {list(PYTHIA)}")
    hidden, layers, heads = PYTHIA[name]
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=PYTHIA_CONTEXT,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def memcpy_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = 10) -> float:
    """Bytes per second moved by np.copyto (read + write), best of `repeats`."""
    source = np.ones(nbytes // 8, dtype=np.float64)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def _streamed_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decoding step reads: all parameters except the input embedding table."""
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if "embed_in" not in n)


def _params(model: torch.nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def step_times(artifact: Path, threads: int | None, provider: str, repeats: int) -> dict[str, dict]:
    """Min and median ms of one forward pass feeding k tokens after PAST cached ones, for k in NEW_TOKENS."""
    session = DynaMoRuntime.load(artifact, provider=provider, threads=threads, check_hashes=False).session
    rng = np.random.default_rng(0)
    vocab = session.manifest.model.vocab_size
    cache = session.empty_cache()
    session.forward(cache, rng.integers(vocab, size=PAST).tolist(), list(range(PAST)))
    out = {}
    for k in NEW_TOKENS:
        tokens, positions = rng.integers(vocab, size=k).tolist(), list(range(PAST, PAST + k))
        times = []
        for i in range(repeats + 2):  # two warm-up passes
            # forward() replaces the cache's arrays and never writes into them: a shallow copy is a fresh cache.
            fresh = KVCache(list(cache.keys), list(cache.values), bytearray(cache.live))
            start = time.perf_counter()
            session.forward(fresh, tokens, positions, last_only=True)  # as ar and dynamic pay it
            if i >= 2:
                times.append(1000 * (time.perf_counter() - start))
        out[str(k)] = {"min_ms": min(times), "median_ms": statistics.median(times)}
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _one(name: str, variant: str, base_dir: Path, work: Path, threads, provider, repeats) -> dict:
    if variant == "base":
        model = GPTNeoXForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        checkpoint = base_dir
    else:
        model = DynaMoForCausalLM.from_gpt_neox(base_dir, num_token_heads=3, head_init="random")
        checkpoint = work / f"{name}-t3"
        model.save_pretrained(checkpoint)
    row = {"params": _params(model), "streamed_bytes": _streamed_bytes(model)}
    del model
    gc.collect()
    start = time.perf_counter()
    export_artifact(checkpoint, out=work / f"{name}-{variant}-onnx", verify=False, progress=False)
    row["export_s"] = time.perf_counter() - start
    artifact = work / f"{name}-{variant}-onnx"
    row["artifact_mb"] = _dir_bytes(artifact) / 2**20
    bandwidth = memcpy_bandwidth()
    row["step"] = step_times(artifact, threads, provider, repeats)
    row["bandwidth_gb_s"] = bandwidth / 1e9
    bound_ms = 1000 * row["streamed_bytes"] / bandwidth
    row["bound_ms"] = bound_ms
    row["ratio_to_bound"] = {k: v["min_ms"] / bound_ms for k, v in row["step"].items()}
    shutil.rmtree(artifact)
    if variant == "t3":
        shutil.rmtree(checkpoint)
    return row


def run_scale(
    sizes: Sequence[str] = tuple(PYTHIA),
    threads: int | None = 1,
    provider: str = "cpu",
    repeats: int = 10,
    workdir: str | None = None,
    progress: bool = True,
) -> dict:
    """Export + step-time table for each size and variant; 'does not fit' where memory is short."""
    for name in sizes:
        pythia_config(name)  # reject unknown sizes before any work
    result = {
        "past_tokens": PAST,
        "threads": threads,
        "export_memory_factor": EXPORT_MEMORY_FACTOR,
        "rows": {},
    }
    with tempfile.TemporaryDirectory(prefix="dynamo-bench-scale-", dir=workdir) as tmp:
        work = Path(tmp)
        for name in tqdm(sizes, desc="scale", unit="size", disable=not progress):
            config = pythia_config(name)
            hidden, layers = config.hidden_size, config.num_hidden_layers
            # 12 h^2 per layer (attention 4 h^2, MLP 8 h^2) + two vocab x hidden tables; T3 adds two layers.
            t3_params = 12 * hidden**2 * (layers + 2) + 2 * config.vocab_size * hidden
            needed = EXPORT_MEMORY_FACTOR * 4 * t3_params
            available = psutil.virtual_memory().available
            if needed > available:
                result["rows"][name] = {
                    "status": "does not fit",
                    "needed_gb": needed / 2**30,
                    "available_gb": available / 2**30,
                }
                continue
            torch.manual_seed(0)
            base_dir = work / f"{name}-base"
            GPTNeoXForCausalLM(config).save_pretrained(base_dir)
            rows = {v: _one(name, v, base_dir, work, threads, provider, repeats) for v in ("base", "t3")}
            shutil.rmtree(base_dir)
            result["rows"][name] = {"status": "ok", **rows}
    return result
