"""Held-out perplexity of the exported graph next to the float32 PyTorch model (dynamo-export --eval-tokens).

The parity check (converters/verify.py) feeds random token ids, which says whether
a graph computes what the model computes but not what a lossy dtype costs on text.
This scores a bounded sample of a held-out token file instead, with the windows of
dynamo_export/evaluation.py: a window is seq_len + n tokens, the graph reads the
first seq_len (one prefill pass with an empty cache, as the runtime starts a
generation) and head i is scored at every position t against the token at t + i,
so all heads are scored on the same positions. The windows are spread evenly over
the file (the first `windows` of them would all come from its first documents).

The PyTorch model reads the same windows, so PPL_i of the graph and of fp32 are
paired figures: their ratio is the dtype's cost and does not move with the sample.
Also reported per head: how often the graph's argmax equals the model's on those
positions (verify's top-1 agreement, on text instead of random ids).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from converters.errors import ExportError
from converters.io_spec import IOSpec
from dynamo_export.errors import TokenFileError
from dynamo_export.tokens import TokenFileMeta, open_tokens, read_token_meta
from runtime.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, POSITION_IDS

DEFAULT_WINDOWS = 16
DEFAULT_SEQ_LEN = 256  # the reference model card's dynamo-eval --seq-len


@dataclass
class HeldoutReport:
    tokens: str  # the token file's name
    windows: int
    seq_len: int
    positions: int  # scored per head (the same positions for every head)
    ppl: list[float]  # per head, the exported graph on ONNX Runtime
    ppl_fp32: list[float]  # per head, the float32 PyTorch model on the same windows
    top1_agreement: list[float]  # per head, graph argmax == model argmax over the scored positions

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        heads = ", ".join(
            f"PPL_{i + 1} {g:.3f} vs {r:.3f} ({100 * (g / r - 1):+.2f}%)"
            for i, (g, r) in enumerate(zip(self.ppl, self.ppl_fp32, strict=True))
        )
        top1 = ", ".join(f"{a:.3f}" for a in self.top1_agreement)
        return (
            f"{self.tokens}, {self.windows} windows x {self.seq_len} tokens ({self.positions} positions per head): "
            f"{heads} (graph vs fp32 PyTorch); top-1 agreement per head [{top1}]"
        )


def check_eval_tokens(
    path: str | os.PathLike, vocab_size: int, num_heads: int, seq_len: int
) -> TokenFileMeta:
    """ExportError unless `path` is a token file of this model's vocabulary holding one window or more."""
    try:
        meta = read_token_meta(path)
    except TokenFileError as exc:
        raise ExportError(f"--eval-tokens {path}: {exc}") from exc
    if meta.vocab_size > vocab_size:
        raise ExportError(
            f"--eval-tokens {path} was tokenized with a vocabulary of {meta.vocab_size} ids but the model has "
            f"{vocab_size}: tokenize the held-out text with the model's own tokenizer"
        )
    if meta.num_tokens < seq_len + num_heads:
        raise ExportError(
            f"--eval-tokens {path} holds {meta.num_tokens} tokens, fewer than one window of "
            f"{seq_len} + {num_heads}: pass a larger held-out file"
        )
    return meta


def window_starts(num_tokens: int, seq_len: int, num_heads: int, windows: int) -> list[int]:
    """Starts of at most `windows` of the file's windows [k*seq_len, k*seq_len + seq_len + n), evenly spread."""
    available = (num_tokens - num_heads) // seq_len
    picked = np.unique(np.linspace(0, available - 1, min(windows, available)).round().astype(np.int64))
    return [int(k) * seq_len for k in picked]


def heldout_perplexity(
    model, onnx_path: Path, spec: IOSpec, tokens: str | os.PathLike, windows: int, seq_len: int, provider: str
) -> HeldoutReport:
    """Score the graph and `model` (float32) on the same held-out windows; see the module docstring."""
    ids, _ = open_tokens(tokens)
    n = model.config.num_token_heads
    session = ort.InferenceSession(str(onnx_path), providers=[provider])
    model = model.eval().float()
    cache = {
        name: np.zeros(spec.inputs[name].shape({"batch": 1, "past": 0, "seq": 0}), np.dtype(spec.cache_dtype))
        for name in spec.past_names()
    }
    nll, nll_fp32, agree, starts = (
        np.zeros(n),
        np.zeros(n),
        np.zeros(n),
        window_starts(len(ids), seq_len, n, windows),
    )
    for start in starts:
        window = np.asarray(ids[start : start + seq_len + n], dtype=np.int64)  # (seq_len + n,)
        feeds = {
            INPUT_IDS: window[None, :seq_len],
            ATTENTION_MASK: np.ones((1, seq_len), np.int64),
            POSITION_IDS: np.arange(seq_len, dtype=np.int64)[None],
            LOGITS_TO_KEEP: np.arange(seq_len, dtype=np.int64),
            **cache,
        }
        graph = session.run([LOGITS], feeds)[0][0].astype(np.float32)  # (n, T, V)
        with torch.no_grad():
            reference = model(torch.from_numpy(window[None, :seq_len])).logits[0].numpy()  # (n, T, V)
        for head in range(n):
            labels = window[head + 1 : head + 1 + seq_len]  # (T,)
            nll[head] += _nll_sum(graph[head], labels)
            nll_fp32[head] += _nll_sum(reference[head], labels)
            agree[head] += np.sum(graph[head].argmax(-1) == reference[head].argmax(-1))
    positions = len(starts) * seq_len
    return HeldoutReport(
        tokens=Path(tokens).name,
        windows=len(starts),
        seq_len=seq_len,
        positions=positions,
        ppl=[math.exp(v / positions) for v in nll],
        ppl_fp32=[math.exp(v / positions) for v in nll_fp32],
        top1_agreement=[float(a / positions) for a in agree],
    )


def _nll_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    """Sum over rows of -log softmax(logits)[label]: (T, V), (T,) -> float, the normaliser in float64."""
    top = logits.max(-1, keepdims=True)  # (T, 1)
    log_z = np.log(np.exp(logits - top, dtype=np.float64).sum(-1)) + top[:, 0]  # (T,)
    return float(np.sum(log_z - logits[np.arange(len(labels)), labels]))
