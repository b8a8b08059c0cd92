"""Parity of the exported graph with the PyTorch model, checked the way a runtime will use it.

Schedule, at batch 1 and batch 2 (row 0 of batch 2 left-padded by two tokens):
prefill of 7 tokens with an empty cache, then a step of 1 token, then a step of
3 tokens, each side feeding back its own cache. Every case compares the output
names, then the shapes, then the values of every output (max abs diff per head
and per present), collects every failure and raises one ParityError at the end.
A greedy decode of 32 tokens (each pass emits every head's argmax, so steps feed
n tokens at once) must then match token for token.

Values are compared at real tokens only (see `_Comparison.compare`). The
reference is always the float32 PyTorch model, so fp16/int8 figures measure the
distance from the model, not from another export. fp32 must agree to 1e-4;
fp16 and int8 cannot, and are held to per-head top-1 agreement instead (0.95
and 0.90 over the schedule's 31 real positions: one or three near-ties may flip),
with their max diff and greedy agreement reported. int4 is held to 0.60: its
4-bit blocks move logits by ~0.5 on the tests' 32-wide random model, whose
heads then agree on 0.71-0.94 of the positions (0.65 at block 16, symmetric),
while the trained reference model's agree on 0.935-0.968; a graph that
computes something else agrees on about 1/vocabulary. What int4 costs on text
is measured by the held-out perplexities (converters/heldout.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from converters.errors import ParityError
from converters.io_spec import IOSpec
from runtime.contract import (
    ATTENTION_MASK,
    CPU_PROVIDER,
    CUDA_PROVIDER,
    INPUT_IDS,
    LOGITS,
    LOGITS_TO_KEEP,
    POSITION_IDS,
)

PREFILL = 7
STEPS = (1, 3)
BATCHES = (1, 2)
PAD = 2  # left padding of row 0 in the batch-2 cases
GREEDY_TOKENS = 32
GREEDY_PROMPT = 4


@dataclass(frozen=True)
class Tolerance:
    """max_abs_diff bounds logits and presents; min_top1 bounds each head's argmax agreement on real tokens."""

    max_abs_diff: float | None
    min_top1: float | None
    greedy_must_match: bool


TOLERANCES = {
    "fp32": Tolerance(max_abs_diff=1e-4, min_top1=None, greedy_must_match=True),
    "fp16": Tolerance(max_abs_diff=None, min_top1=0.95, greedy_must_match=False),
    "int8": Tolerance(max_abs_diff=None, min_top1=0.90, greedy_must_match=False),
    "int4": Tolerance(max_abs_diff=None, min_top1=0.60, greedy_must_match=False),
}


def provider_for(dtype: str) -> str:
    """fp16 is meant for CUDA and is verified there when this onnxruntime has it; everything else on CPU.

    ONNX Runtime's CPU provider also runs the fp16 graph, so a machine without a
    GPU still checks it; the report names the provider that produced the figures.
    """
    if dtype == "fp16" and CUDA_PROVIDER in ort.get_available_providers():
        return CUDA_PROVIDER
    return CPU_PROVIDER


@dataclass
class ParityReport:
    dtype: str
    provider: str
    tolerance: Tolerance
    cases: list[str] = field(default_factory=list)
    logits_max_abs_diff: list[float] = field(default_factory=list)  # per head
    present_max_abs_diff: dict[str, float] = field(default_factory=dict)
    top1_agreement: list[float] = field(default_factory=list)  # per head, over real (unpadded) positions
    greedy_tokens: int = 0
    greedy_matched: int = 0  # tokens equal before the first divergence

    def to_dict(self) -> dict:
        return {**asdict(self), "status": "passed"}

    def summary(self) -> str:
        heads = ", ".join(f"{d:.2e}" for d in self.logits_max_abs_diff)
        top1 = ", ".join(f"{a:.3f}" for a in self.top1_agreement)
        present = max(self.present_max_abs_diff.values(), default=0.0)
        return (
            f"{self.dtype} on {self.provider}: {len(self.cases)} cases, logits max|diff| per head [{heads}], "
            f"presents max|diff| {present:.2e}, top-1 agreement per head [{top1}], "
            f"greedy {self.greedy_matched}/{self.greedy_tokens} tokens"
        )


class _Comparison:
    """Accumulates the figures and every failure across cases."""

    def __init__(self, spec: IOSpec, num_heads: int, report: ParityReport):
        self.spec, self.report, self.failures = spec, report, []
        report.logits_max_abs_diff = [0.0] * num_heads
        report.present_max_abs_diff = dict.fromkeys(spec.present_names(), 0.0)
        self.agree, self.total = np.zeros(num_heads), 0

    def compare(self, case: str, names: list[str], ort_out: list[np.ndarray], ref: dict, mask: np.ndarray):
        """Values are compared at real tokens only: `mask` (B, past + seq) is the attention mask.

        Padded positions compute garbage that nothing reads (their queries see no
        keys, their keys are masked for everyone), and that garbage legitimately
        differs between dtypes.
        """
        self.report.cases.append(case)
        keys = mask.astype(bool)  # (B, S)
        queries = keys[:, -ort_out[0].shape[2] :]  # (B, T)
        got = dict(zip(names, ort_out, strict=True))  # names were checked against the contract already
        same_shape = []
        for name in names:
            if got[name].shape == ref[name].shape:
                same_shape.append(name)
            else:
                self.failures.append(f"{case}: {name} has shape {got[name].shape}, PyTorch {ref[name].shape}")
        for name in same_shape:
            if name == LOGITS:
                self._logits(case, got[name].astype(np.float32), ref[name], queries)
            else:
                error = np.abs(got[name].astype(np.float32) - ref[name]).transpose(0, 2, 1, 3)  # (B, S, H, D)
                diff = float(error[keys].max(initial=0.0))
                self.report.present_max_abs_diff[name] = max(self.report.present_max_abs_diff[name], diff)
                self._bound(case, name, diff)

    def _logits(self, case: str, got: np.ndarray, ref: np.ndarray, real: np.ndarray) -> None:
        for head in range(got.shape[1]):  # (B, n, T, V)
            diff = float(np.abs(got[:, head] - ref[:, head])[real].max(initial=0.0))
            self.report.logits_max_abs_diff[head] = max(self.report.logits_max_abs_diff[head], diff)
            self._bound(case, f"logits head {head + 1}", diff)
            same = got[:, head].argmax(-1) == ref[:, head].argmax(-1)  # (B, T)
            self.agree[head] += same[real].sum()
        self.total += int(real.sum())

    def _bound(self, case: str, what: str, diff: float) -> None:
        limit = self.report.tolerance.max_abs_diff
        if not np.isfinite(diff) or (limit is not None and diff > limit):
            self.failures.append(f"{case}: {what} max|diff| {diff:.3e} exceeds {limit}")

    def finish(self) -> None:
        self.report.top1_agreement = [float(a / max(self.total, 1)) for a in self.agree]
        limit = self.report.tolerance.min_top1
        for head, agreement in enumerate(self.report.top1_agreement):
            if limit is not None and agreement < limit:
                self.failures.append(f"head {head + 1}: top-1 agreement {agreement:.3f} is below {limit}")


def verify_graph(model, onnx_path: Path, spec: IOSpec, dtype: str, seed: int = 0) -> ParityReport:
    """Run the schedule above on ONNX Runtime and on `model`; raise ParityError listing every failure."""
    provider = provider_for(dtype)
    try:
        session = ort.InferenceSession(str(onnx_path), providers=[provider])
    except Exception as exc:  # onnxruntime raises its own pybind types (InvalidGraph, NotImplemented, Fail)
        raise ParityError(
            f"onnxruntime {ort.__version__} cannot load {onnx_path}: {exc}; "
            "if a newer --opset was asked for, try the default"
        ) from exc
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    if inputs != spec.input_names or names != spec.output_names:
        # Without the contract's names nothing can be fed or compared; the shapes and values wait for a fix.
        raise ParityError(
            f"{onnx_path}: graph inputs {inputs} / outputs {names} differ from the contract "
            f"{spec.input_names} / {spec.output_names}"
        )
    model = model.eval().float()
    config = model.config
    report = ParityReport(dtype=dtype, provider=provider, tolerance=TOLERANCES[dtype])
    check = _Comparison(spec, config.num_token_heads, report)
    rng = np.random.default_rng(seed)
    cache_dtype = np.dtype(spec.cache_dtype)

    for batch in BATCHES:
        mask = np.ones((batch, 0), dtype=np.int64)
        ort_past = _empty_cache(spec, config, batch, cache_dtype)
        torch_past = None
        for seq in (PREFILL, *STEPS):
            step_mask = np.ones((batch, seq), dtype=np.int64)
            if mask.shape[1] == 0 and batch > 1:
                step_mask[0, :PAD] = 0
            mask = np.concatenate([mask, step_mask], axis=1)
            ids = rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int64)
            positions = np.clip(mask.cumsum(-1) - 1, 0, None)[:, -seq:]
            every = np.arange(seq, dtype=np.int64)  # every position: the reference returns them all
            feeds = {
                INPUT_IDS: ids,
                ATTENTION_MASK: mask,
                POSITION_IDS: positions,
                LOGITS_TO_KEEP: every,
                **ort_past,
            }
            ort_out = session.run(None, feeds)
            ref, torch_past = _torch_step(model, ids, mask, positions, torch_past, spec)
            past = mask.shape[1] - seq
            case = f"batch={batch} {'prefill' if past == 0 else 'step'} seq={seq} past={past}"
            check.compare(case, names, ort_out, ref, mask)
            ort_past = dict(zip(spec.past_names(), ort_out[1:], strict=True))
    check.finish()

    prompt = [int(t) for t in rng.integers(0, config.vocab_size, GREEDY_PROMPT)]
    ort_tokens = _greedy(
        lambda new, total, past: _ort_greedy_step(session, spec, new, total, past),
        _empty_cache(spec, config, 1, cache_dtype),
        prompt,
    )
    torch_tokens = _greedy(lambda new, total, past: _torch_greedy_step(model, new, total, past), None, prompt)
    report.greedy_tokens = GREEDY_TOKENS
    report.greedy_matched = _common_prefix(ort_tokens, torch_tokens)
    if report.tolerance.greedy_must_match and report.greedy_matched < GREEDY_TOKENS:
        check.failures.append(
            f"greedy decode diverges at token {report.greedy_matched}: ONNX {ort_tokens} vs PyTorch {torch_tokens}"
        )
    if check.failures:
        raise ParityError(
            f"{onnx_path} disagrees with PyTorch ({dtype}, {len(check.failures)} failures): "
            + "; ".join(check.failures)
        )
    return report


def _empty_cache(spec: IOSpec, config, batch: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    shape = (batch, config.num_attention_heads, 0, config.hidden_size // config.num_attention_heads)
    return {name: np.zeros(shape, dtype=dtype) for name in spec.past_names()}


def _torch_step(model, ids, mask, positions, past, spec: IOSpec):
    with torch.no_grad():
        out = model(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            past_key_values=past,
            use_cache=True,
        )
    presents = [t for key_value in out.past_key_values for t in key_value]
    ref = {
        LOGITS: out.logits.numpy(),
        **{n: t.numpy() for n, t in zip(spec.present_names(), presents, strict=True)},
    }
    return ref, out.past_key_values


def _greedy(step, past, prompt: list[int]) -> list[int]:
    """Each pass feeds the tokens emitted last and emits the argmax of every head at the last position."""
    new, total, emitted = prompt, len(prompt), []
    while len(emitted) < GREEDY_TOKENS:
        logits, past = step(new, total, past)  # logits (n, V) at the last fed position
        new = [int(i) for i in logits.argmax(-1)]
        emitted += new
        total += len(new)
    return emitted[:GREEDY_TOKENS]


def _ort_greedy_step(session, spec: IOSpec, new: list[int], total: int, past: dict):
    feeds = {
        INPUT_IDS: np.array([new], dtype=np.int64),
        ATTENTION_MASK: np.ones((1, total), dtype=np.int64),
        POSITION_IDS: np.arange(total - len(new), total, dtype=np.int64)[None],
        LOGITS_TO_KEEP: np.array([len(new) - 1], dtype=np.int64),  # the last row only, as the runtime asks
        **past,
    }
    out = session.run(None, feeds)
    return out[0][0, :, -1].astype(np.float32), dict(zip(spec.past_names(), out[1:], strict=True))


def _torch_greedy_step(model, new: list[int], total: int, past):
    with torch.no_grad():
        out = model(
            torch.tensor([new]),
            attention_mask=torch.ones(1, total, dtype=torch.long),
            position_ids=torch.arange(total - len(new), total)[None],
            past_key_values=past,
            use_cache=True,
        )
    return out.logits[0, :, -1].numpy(), out.past_key_values


def _common_prefix(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))
