"""What do DynaMo's extra heads cost per forward pass? ONNX Runtime step time, base vs DynaMo-T3.

Exports the Pythia-70M and Pythia-410M architectures with random weights
(timing does not depend on the values), once as the base model (one head) and
once as DynaMo-T3 (two extra decoder layers, embed_out shared), and times one
step of ONNX Runtime on this machine's CPU with 128 tokens of past: 1 new token
(plain decoding) and 3 new tokens (feeding back a 3-token emission). Runs of
all variants are interleaved so that load from other processes hits them alike;
min and median over the repeats are printed, and T3/base of each.

Each variant is timed as exported and after onnxruntime's transformer fusions
(converters.optimize.fuse), which is how `dynamo-export --optimize` was judged.

    python -m benchmarks.bench_head_cost [--arch 70m 410m] [--repeats 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from converters.io_spec import IOSpec, dummy_inputs, io_spec
from converters.onnx_export import export_onnx
from converters.optimize import fuse
from dynamo_export import DynaMoForCausalLM
from runtime.contract import BATCH, CPU_PROVIDER, PAST, SEQ

ARCHS = {
    "70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
PAST_TOKENS = 128
NEW_TOKENS = (1, 3)


def pythia_config(arch: str) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=50304,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        **ARCHS[arch],
    )


def export_variant(base: GPTNeoXForCausalLM, heads: int, folder: Path) -> tuple[Path, Path, IOSpec, dict]:
    """Export one variant; returns (exported, fused, its I/O spec, figures)."""
    model = DynaMoForCausalLM.from_gpt_neox(base, num_token_heads=heads).eval()
    spec = io_spec(model.config)
    start = time.perf_counter()
    exported = export_onnx(model, folder / "export" / "model.onnx", spec, opset=18)
    export_seconds = time.perf_counter() - start
    start = time.perf_counter()
    stats = fuse(
        exported, folder / "fused" / "model.onnx", model.config.num_attention_heads, model.config.hidden_size
    )
    figures = {
        "params": sum(p.numel() for p in model.parameters()),
        "export_s": export_seconds,
        "fuse_s": time.perf_counter() - start,
        "bytes": sum(p.stat().st_size for p in exported.parent.iterdir()),
        "fusions": stats,
    }
    return exported, folder / "fused" / "model.onnx", spec, figures


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=[CPU_PROVIDER])


def time_steps(sessions: dict[str, ort.InferenceSession], specs: dict, vocab: int, new: int, repeats: int):
    """Interleaved step times in ms: {variant: array of repeats}."""
    return time_passes(sessions, specs, vocab, (new,), repeats)[new]


def time_passes(
    sessions: dict[str, ort.InferenceSession], specs: dict, vocab: int, news: tuple[int, ...], repeats: int
) -> dict[int, dict[str, np.ndarray]]:
    """Step times in ms, {new tokens: {variant: array of repeats}}, every variant and every pass size
    interleaved within each repeat, so load from other processes hits all of them alike (a ratio of
    a 3-token to a 1-token pass is only fair measured side by side)."""
    rng = np.random.default_rng(0)
    feeds = {
        (name, new): dummy_inputs(specs[name], {BATCH: 1, SEQ: new, PAST: PAST_TOKENS}, vocab, rng)
        for new in news
        for name in sessions
    }
    for (name, _), feed in feeds.items():  # warm-up: allocations, pre-packed weights
        for _ in range(3):
            sessions[name].run(None, feed)
    times = {key: [] for key in feeds}
    for _ in range(repeats):
        for (name, new), feed in feeds.items():
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name, new].append(1e3 * (time.perf_counter() - start))
    return {new: {name: np.array(times[name, new]) for name in sessions} for new in news}


def bench_arch(arch: str, repeats: int, threads: int, workdir: Path) -> None:
    torch.manual_seed(0)
    config = pythia_config(arch)
    base = GPTNeoXForCausalLM(config).eval()
    paths, figures, specs = {}, {}, {}
    for heads, label in ((1, "base"), (3, "T3")):
        exported, fused, spec, figures[label] = export_variant(base, heads, workdir / arch / label)
        paths[label], paths[f"{label}+fused"] = exported, fused
        specs[label] = specs[f"{label}+fused"] = spec
    del base
    gc.collect()

    print(f"\n== Pythia-{arch} architecture (random weights), ORT {ort.__version__}, {threads} thread(s) ==")
    for label in ("base", "T3"):
        f = figures[label]
        print(
            f"{label:>5}: {f['params'] / 1e6:7.1f}M params, export {f['export_s']:5.1f}s, "
            f"{f['bytes'] / 2**20:7.1f} MiB, fuse {f['fuse_s']:5.1f}s ({f['fusions']})"
        )
    overhead = figures["T3"]["params"] / figures["base"]["params"] - 1
    print(f"parameter overhead of T3: {100 * overhead:.2f}%")

    sessions = {name: session(path, threads) for name, path in paths.items()}
    print(
        f"{'new tokens':>10} {'variant':>9} {'min ms':>8} {'median ms':>10} {'T3/base min':>12} {'T3/base med':>12}"
    )
    for new in NEW_TOKENS:
        times = time_steps(sessions, specs, config.vocab_size, new, repeats)
        for name in sessions:
            reference = "base+fused" if name.endswith("+fused") else "base"
            ratio_min = np.min(times[name]) / np.min(times[reference])
            ratio_med = np.median(times[name]) / np.median(times[reference])
            print(
                f"{new:>10} {name:>10} {np.min(times[name]):8.2f} {np.median(times[name]):10.2f} "
                f"{ratio_min:12.3f} {ratio_med:12.3f}"
            )
        for label in ("base", "T3"):
            gain = np.median(times[label]) / np.median(times[f"{label}+fused"])
            print(f"{'':>10} fusions speed up {label} by x{gain:.3f} (median)")
    del sessions
    gc.collect()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=["70m", "410m"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=1, help="ORT intra-op threads (1 is steadiest on a busy box)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_head_cost-") as workdir:
        for arch in args.arch:
            bench_arch(arch, args.repeats, args.threads, Path(workdir))


if __name__ == "__main__":
    main()
