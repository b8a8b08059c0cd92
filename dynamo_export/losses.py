"""The modified causal-LM objective and the per-head log-likelihoods evaluation needs.

Head i (index i-1 in the model's logits) at position t predicts token t+i from
tokens 0..t (docs/METHOD.md). The loss functions take the logits the model
produced for the first T tokens and a `tokens` tensor that starts with those T
input tokens and may run past them: training and evaluation feed windows of
T + n tokens so that every head has a label at every one of the T positions,
while a bare `tokens = input_ids` gives the textbook "skip positions without a
label".
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class MultiTokenLoss(NamedTuple):
    total: torch.Tensor  # scalar: sum over heads
    per_head: torch.Tensor  # (n,): head i's mean negative log-likelihood at index i-1


def _check_shapes(logits: torch.Tensor, tokens: torch.Tensor) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be (batch, heads, seq, vocab), got shape {tuple(logits.shape)}")
    if tokens.dim() != 2 or tokens.shape[0] != logits.shape[0]:
        raise ValueError(f"tokens must be (batch={logits.shape[0]}, length), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] < logits.shape[2]:
        raise ValueError(
            f"tokens ({tokens.shape[1]}) must hold at least the {logits.shape[2]} input tokens the logits cover"
        )


def _token_nll(head_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(head_logits)[target] per position, in float32 whatever the model dtype. (B, P)"""
    batch, positions, vocab = head_logits.shape
    nll = F.cross_entropy(head_logits.reshape(-1, vocab).float(), targets.reshape(-1), reduction="none")
    return nll.view(batch, positions)


def multi_token_loss(logits: torch.Tensor, tokens: torch.Tensor, first_head: int = 1) -> MultiTokenLoss:
    """Per-head mean of -log p_i(x[t+i] | x[0..t]) over the positions that have a label; total = sum.

    logits: (B, k, T, V) for heads first_head .. first_head+k-1 (all n heads by
    default; training passes head 1 and heads 2..n apart); tokens: (B, S) with
    S >= T and tokens[:, :T] the model input. Head i uses positions
    t < min(T, S - i); a head left with no position is an error, because
    silently dropping it would train the other heads only.
    """
    _check_shapes(logits, tokens)
    _, num_heads, seq, _ = logits.shape
    per_head = []
    for j in range(num_heads):
        offset = first_head + j  # head i predicts t + i
        count = min(seq, tokens.shape[1] - offset)
        if count <= 0:
            raise ValueError(
                f"head {offset} has no label: {tokens.shape[1]} tokens leave no position t with t+{offset} present"
            )
        per_head.append(_token_nll(logits[:, j, :count], tokens[:, offset : offset + count]).mean())
    per_head = torch.stack(per_head)  # (k,)
    return MultiTokenLoss(total=per_head.sum(), per_head=per_head)


def head_log_likelihoods(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p_i(x[t+i] | x[0..t]) for every head on the SAME positions: (B, n, P).

    The positions are t < P = min(T, S - n), the ones where even head n has a
    label, so that the heads' perplexities average over identical contexts and
    can be compared (and multiplied into a joint) position by position.
    """
    _check_shapes(logits, tokens)
    _, num_heads, seq, _ = logits.shape
    positions = min(seq, tokens.shape[1] - num_heads)
    if positions <= 0:
        raise ValueError(
            f"{tokens.shape[1]} tokens leave no position where all {num_heads} heads have a label"
        )
    per_head = [
        -_token_nll(logits[:, j, :positions], tokens[:, j + 1 : j + 1 + positions]) for j in range(num_heads)
    ]
    return torch.stack(per_head, dim=1)  # (B, n, P)


def joint_log_likelihood(head_ll: torch.Tensor) -> torch.Tensor:
    """log J(x[t+1..t+n] | x[0..t]) with J the product of the head marginals: (B, n, P) -> (B, P).

    This is the joint *without* co-occurrence masking (the model alone); the
    masked joint of docs/METHOD.md needs the corpus counts and lives with them.
    """
    return head_ll.sum(dim=1)


def head1_distillation_kl(
    head1_logits: torch.Tensor, later_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p_1 || p_i) for heads i = 2..n, each the mean over its positions: (n-1,).

    head1_logits: (B, T, V), head 1's; later_logits: (B, n-1, T, V), heads
    2..n's (`logits[:, 0]` and `logits[:, 1:]` of the model's output). Head i at
    position t predicts x[t+i]; so does head 1 at position t+i-1. p_1 there is
    the teacher (detached: it receives no gradient from this term) and p_i at t
    the student, both softmax(logits / temperature). Positions t with t+i-1
    outside the logits have no teacher and are skipped. No T**2 factor: the term
    is mixed with the cross-entropy by a weight the caller chooses.
    """
    if head1_logits.dim() != 3 or later_logits.dim() != 4:
        raise ValueError(
            f"need head 1's logits (batch, seq, vocab) and heads 2..n's (batch, heads, seq, vocab), got shapes "
            f"{tuple(head1_logits.shape)} and {tuple(later_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    seq = head1_logits.shape[1]
    teacher_all = F.log_softmax(head1_logits.detach().float() / temperature, dim=-1)  # (B, T, V)
    per_head = []
    for j in range(1, later_logits.shape[1] + 1):  # head i = j+1 at t <-> head 1 at t+j
        count = seq - j
        if count <= 0:
            raise ValueError(f"head {j + 1} has no teacher position: {seq} positions, offset {j}")
        student = F.log_softmax(later_logits[:, j - 1, :count].float() / temperature, dim=-1)  # (B, count, V)
        teacher = teacher_all[:, j:]  # (B, count, V)
        kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)  # (B, count)
        per_head.append(kl.mean())
    return torch.stack(per_head) if per_head else head1_logits.new_zeros(0)
