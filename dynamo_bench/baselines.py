"""The base model through the two stacks users would otherwise deploy: Optimum ONNX Runtime and PyTorch.

Both sample like the artifact's defaults (top-k 50, temperature 0.7,
repetition penalty 1.1; runtime/config.py) with transformers' generate(),
seeded per call through torch.manual_seed, one prompt at a time, on the same
thread count. transformers' repetition penalty divides positive logits rather
than probabilities, so the token streams differ from the runtime's `ar`; the
comparison is of speed and judged quality, not of tokens.

Optimum exports the base checkpoint once, from the local directory only
(nothing is downloaded). Checkpoints stored in fp16 (the shipped reference
models) are first re-saved in fp32 so that Optimum's graph, PyTorch and the
fp32 artifact all compute in the same precision.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import GPTNeoXForCausalLM
from transformers.generation.streamers import BaseStreamer

from dynamo_bench.errors import BenchError
from dynamo_bench.latency import Sample
from dynamo_export.checkpoint import checkpoint_kind
from runtime import SamplingConfig
from runtime.contract import ORT_PROVIDERS


class _FirstTokenClock(BaseStreamer):
    """Records when generate() hands over its first new token (its first put() is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class HFRunner:
    """Any transformers-compatible causal LM (PyTorch or Optimum's ORT wrapper) behind the Runner protocol."""

    def __init__(self, model, config: SamplingConfig, eos_token_id: int | None):
        self.model = model
        self.kwargs = {
            "do_sample": not config.greedy,
            "top_k": config.top_k,
            "temperature": config.temperature if not config.greedy else None,
            "top_p": None,
            "repetition_penalty": config.repetition_penalty,
            "eos_token_id": eos_token_id,
            "pad_token_id": eos_token_id if eos_token_id is not None else 0,
        }

    @torch.no_grad()
    def __call__(self, prompt_ids: Sequence[int], max_new_tokens: int, seed: int) -> Sample:
        torch.manual_seed(seed)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)  # (1, T)
        clock = _FirstTokenClock()
        start = time.perf_counter()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            streamer=clock,
            **self.kwargs,
        )
        wall = time.perf_counter() - start
        new = out[0, ids.shape[1] :].tolist()
        eos = self.kwargs["eos_token_id"]
        if eos is not None and eos in new:  # the runtime stops at eos without emitting it; so do we here
            new = new[: new.index(eos)]
        first = clock.first_token_at if clock.first_token_at is not None else start + wall
        return Sample(tuple(new), wall, first - start)


def _check_base(base_dir: str | os.PathLike) -> Path:
    base_dir = Path(base_dir)
    kind = checkpoint_kind(base_dir)  # CheckpointError for a missing or foreign directory
    if kind != "gpt_neox":
        raise BenchError(
            f"--baseline {base_dir} is a {kind} checkpoint: pass the base model (GPT-NeoX/Pythia) the "
            "artifact was built from"
        )
    return base_dir


def load_torch_base(base_dir: str | os.PathLike) -> GPTNeoXForCausalLM:
    return GPTNeoXForCausalLM.from_pretrained(_check_base(base_dir), dtype=torch.float32).eval()


def pytorch_runner(model: GPTNeoXForCausalLM, config: SamplingConfig) -> HFRunner:
    return HFRunner(model, config, model.config.eos_token_id)


def optimum_runner(
    model: GPTNeoXForCausalLM, config: SamplingConfig, threads: int | None, provider: str = "cpu"
) -> HFRunner:
    """Export `model` (already fp32) with Optimum into a temporary directory and load it on ORT."""
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    ort_provider = ORT_PROVIDERS[provider][0]
    with tempfile.TemporaryDirectory(prefix="dynamo-bench-optimum-") as tmp:
        model.save_pretrained(tmp)  # fp32, local: Optimum never looks at the Hub
        ort_model = ORTModelForCausalLM.from_pretrained(
            tmp, export=True, local_files_only=True, session_options=options, provider=ort_provider
        )
    return HFRunner(ort_model, config, model.config.eos_token_id)
