"""Self-distillation of heads 2..n towards head 1 (Medusa-2 style), with the gradient kept in the heads.

`dynamo-train --distill W` trains head i >= 2 on

    loss_i = (1 - W) * CE_i + W * KL_i,   KL_i = KL(p_1 || p_i) at temperature T

where p_1 is head 1's distribution, detached, at the position that predicts the
same token as head i (`losses.head1_distillation_kl`). Head 1 keeps its plain
cross-entropy. Why: in `verify` mode a draft from head i is accepted with
probability sum_x min(p_1(x), q_i(x)), so a head that matches head 1's
distribution drafts better than one that only matches the data.

Gradient paths. The cross-entropy terms reach every weight as before (heads
2..n's share into the stem at the LR_MB rate). The KL term is a statement about
the heads 2..n only: moving the stem, head 1 or the shared embed_out/embed_in
towards agreement would change head 1 itself (the teacher), so its gradient is
taken with `torch.autograd.grad(..., inputs=<heads 2..n's parameters>)` and
added to their `.grad`. autograd then runs only the nodes between the KL and
those parameters (the heads' layer norms, decoder layers and the unembedding's
input side); the stem's nodes and every other parameter's accumulation are
never executed (tests/test_distill.py hooks them to make sure).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dynamo_export.losses import head1_distillation_kl, multi_token_loss


class StepLosses(NamedTuple):
    ce: torch.Tensor  # (n,) detached: head i's mean cross-entropy at index i-1
    kl: torch.Tensor  # (n-1,) detached: KL(p_1 || p_i) for heads 2..n, empty without distillation


def new_head_parameters(model) -> list[torch.nn.Parameter]:
    """Heads 2..n's own parameters (decoder layer + final layer norm): where the KL term may go."""
    return [p for head in model.heads[1:] for p in head.parameters()]


def backward_losses(
    model, logits: torch.Tensor, tokens: torch.Tensor, distill: float, temperature: float, accum: int = 1
) -> StepLosses:
    """Backpropagate the training loss of one micro-batch, divided by `accum`, into `.grad`; return its parts.

    distill == 0 is the plain modified-CLM objective (sum of the heads' CE), the
    exact computation training did before distillation existed.
    """
    ce = multi_token_loss(logits, tokens).per_head  # (n,)
    if distill == 0:
        (ce.sum() / accum).backward()
        return StepLosses(ce.detach(), ce.new_zeros(0))
    if logits.shape[1] < 2:
        raise ValueError("distillation needs heads 2..n: this model has one head")
    kl = head1_distillation_kl(logits, temperature)  # (n-1,)
    params = new_head_parameters(model)
    # The KL's gradient first, restricted to the heads' own weights; the graph stays for the CE.
    kl_grads = torch.autograd.grad(kl.sum() * distill / accum, params, retain_graph=True)
    ce_total = ce[0] + (1.0 - distill) * ce[1:].sum()
    (ce_total / accum).backward()
    with torch.no_grad():
        for param, grad in zip(params, kl_grads, strict=True):
            if param.grad is None:
                param.grad = grad.clone()
            else:
                param.grad += grad
    return StepLosses(ce.detach(), kl.detach())
