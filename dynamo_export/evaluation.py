"""Multi-token perplexity over a token file: PPL_1..PPL_n and PPL_1:n (docs/METHOD.md, "Evaluation").

Windows. The file is cut into windows of seq_len + n tokens that start every
seq_len tokens (window k starts at k*seq_len). The model reads the first
seq_len tokens of a window and every head i is scored at all seq_len positions
t against the token at t+i, which the n extra tokens supply. So:
- every position of the file (up to a tail shorter than one window) is scored
  exactly once, with the context restarting at each window start;
- all heads are scored on the SAME positions (only positions where t+n exists),
  so PPL_1..PPL_n differ only by how far ahead the head looks, and the joint
  multiplies the heads' probabilities position by position.
Windows run across document boundaries (end-of-text tokens are ordinary
tokens here), as in packed training.

Joint. PPL_1:n = exp(-(1/n) mean_t log J(x[t+1..t+n] | x[0..t])) with J the
product of the head marginals, *without* co-occurrence masking. With that J,
PPL_1:n is the geometric mean of PPL_1..PPL_n.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dynamo_export.checkpoint import checkpoint_kind
from dynamo_export.config import DynaMoConfig
from dynamo_export.errors import TokenFileError
from dynamo_export.losses import head_log_likelihoods, joint_log_likelihood
from dynamo_export.modeling import DynaMoForCausalLM
from dynamo_export.tokens import TokenFileMeta
from runtime.fingerprint import check_same_tokenizer


@dataclass
class EvalResult:
    num_token_heads: int
    seq_len: int
    num_windows: int
    num_positions: int  # positions scored per head (the same for every head)
    nll_per_head: list[float]  # mean -log p_i, i = 1..n (natural log)
    joint_nll: float  # mean -log J over the same positions

    @property
    def ppl_per_head(self) -> list[float]:
        return [math.exp(v) for v in self.nll_per_head]

    @property
    def ppl_joint(self) -> float:
        return math.exp(self.joint_nll / self.num_token_heads)

    def metrics(self) -> dict[str, float]:
        """{"PPL_1": .., ..., "PPL_n": .., "PPL_1:2": .., ..., "PPL_1:n": ..} (the paper's Table 2 columns).

        The joint over heads 1..k is the product of their marginals, so its mean
        -log is the sum of the first k heads' NLLs; PPL_1:n uses joint_nll itself.
        """
        n = self.num_token_heads
        out = {f"PPL_{i + 1}": p for i, p in enumerate(self.ppl_per_head)}
        for k in range(2, n):
            out[f"PPL_1:{k}"] = math.exp(sum(self.nll_per_head[:k]) / k)
        out[f"PPL_1:{n}"] = self.ppl_joint
        return out

    def to_json(self) -> dict:
        return {**asdict(self), "ppl": self.metrics()}


def check_vocab(
    meta: TokenFileMeta,
    config: DynaMoConfig,
    token_path: str | os.PathLike,
    model_source: str | os.PathLike | None = None,
) -> None:
    """A token file fits a model when every id it may hold has an embedding row, from the same tokenizer.

    Pythia pads its embedding beyond the tokenizer (50304 rows for 50277 ids),
    so the size check is <=, not ==. The sizes cannot tell two tokenizers of one
    vocabulary size apart, so the fingerprints are compared as well: the model's is
    its config's `tokenizer_fingerprint` (what training or `checkpoint_fingerprint`
    recorded), unknown for checkpoints from before fingerprints.
    """
    check_same_tokenizer(
        getattr(config, "tokenizer_fingerprint", None),
        f"model {model_source or 'checkpoint'}",
        meta.tokenizer_fingerprint,
        f"token file {token_path}",
        "tokenize the text with the model's own tokenizer (dynamo-data tokenize --tokenizer "
        f"{os.path.join(model_source, 'tokenizer.json') if model_source else 'MODEL/tokenizer.json'})",
    )
    if meta.vocab_size > config.vocab_size:
        raise TokenFileError(
            f"{token_path} was tokenized with a vocabulary of {meta.vocab_size} ids but the model has only "
            f"{config.vocab_size} embedding rows: tokenize the text with the model's own tokenizer"
        )


def window_plan(
    tokens: int, seq_len: int, n: int, batch_size: int, max_batches: int | None
) -> tuple[int, int]:
    """(windows, batches) a pass over a `tokens`-long file scores; a file too short for one window is an error."""
    windows = num_windows(tokens, seq_len, n)
    if windows == 0:
        raise TokenFileError(
            f"the token file holds {tokens} tokens, fewer than one window of seq_len + n = {seq_len + n}: "
            "use a smaller --seq-len or more text"
        )
    batches = math.ceil(windows / batch_size)
    if max_batches is not None:
        batches = min(batches, max_batches)
    return min(windows, batches * batch_size), batches


def num_windows(num_tokens: int, seq_len: int, num_heads: int) -> int:
    """Windows [k*seq_len, k*seq_len + seq_len + n) that fit in the file."""
    return max(0, (num_tokens - num_heads) // seq_len)


def load_eval_model(path: str | os.PathLike) -> DynaMoForCausalLM:
    """A DynaMo checkpoint as it is; a plain GPT-NeoX one as a DynaMo model with n = 1 (bit-identical head 1)."""
    if checkpoint_kind(path) == "gpt_neox":
        return DynaMoForCausalLM.from_gpt_neox(path, num_token_heads=1).eval()
    return DynaMoForCausalLM.from_pretrained(path)


@torch.no_grad()
def evaluate(
    model: DynaMoForCausalLM,
    ids: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Score `ids` (a memmapped token file) window by window; see the module docstring."""
    n = model.num_token_heads
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    windows, batches = window_plan(len(ids), seq_len, n, batch_size, max_batches)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    head_sum = torch.zeros(n, dtype=torch.float64)
    joint_sum = torch.zeros((), dtype=torch.float64)
    positions = 0
    try:
        for b in tqdm(range(batches), desc="eval", unit="batch", disable=not progress, leave=False):
            starts = range(b * batch_size * seq_len, min((b + 1) * batch_size, windows) * seq_len, seq_len)
            window = torch.from_numpy(
                np.stack([np.asarray(ids[s : s + seq_len + n], dtype=np.int64) for s in starts])
            ).to(device)  # (B, seq_len + n)
            logits = model(window[:, :seq_len]).logits  # (B, n, seq_len, V)
            head_ll = head_log_likelihoods(logits, window)  # (B, n, seq_len)
            head_sum -= head_ll.sum(dim=(0, 2)).double().cpu()
            joint_sum -= joint_log_likelihood(head_ll).sum().double().cpu()
            positions += head_ll.shape[0] * head_ll.shape[2]
    finally:
        model.train(was_training)
    return EvalResult(
        num_token_heads=n,
        seq_len=seq_len,
        num_windows=windows,
        num_positions=positions,
        nll_per_head=(head_sum / positions).tolist(),
        joint_nll=float(joint_sum / positions),
    )


def format_table(result: EvalResult) -> str:
    rows = [("metric", "value")] + [(k, f"{v:.4f}") for k, v in result.metrics().items()]
    rows.append(("positions", str(result.num_positions)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>12}" for name, value in rows)
