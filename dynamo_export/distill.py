"""A training step's two gradient sources, and self-distillation of heads 2..n towards head 1 (Medusa-2 style).

Gradient sources (docs/METHOD.md, "Training"). Each source's gradient is
that of its own loss only, and each has its own AdamW
(`three_rates.ThreeRateAdamW`), so a base weight both reach keeps two Adam states:

    head 1:      CE_1            -> base weights: embed_in, stem, head 1, embed_out   (LR_B)
    heads 2..n:  sum_i>=2 loss_i -> their own decoder layers and layer norms          (LR_M)
                                    + shared base weights: embed_in, stem, embed_out  (LR_MB, only if > 0)

Each source is one `torch.autograd.grad` over the micro-batch's graph,
restricted to the parameters it may move, from its own logits
(`DynaMoForCausalLM.source_logits`: one unembedding MatMul per source), so
head 1's backward never enters heads 2..n. With LR_MB = 0 the heads' source
asks for their own weights only, so autograd never runs the stem's backward
for it nor the unembedding's weight gradient. Under `--fsdp` a source's
gradient is one `backward` instead (`fsdp.backward_gradients`: FSDP's sharded
parameters are not in the graph), which does run those backwards and drops
what the source does not move.

Self-distillation (`dynamo-train --distill W`) trains head i >= 2 on

    loss_i = (1 - W) * CE_i + W * KL_i,   KL_i = KL(p_1 || p_i) at temperature T

where p_1 is head 1's distribution, detached, at the position that predicts the
same token as head i (`losses.head1_distillation_kl`). Head 1 keeps its plain
cross-entropy. Why: in `verify` mode a draft from head i is accepted with
probability sum_x min(p_1(x), q_i(x)), so a head that matches head 1's
distribution drafts better than one that only matches the data. The KL term is
a statement about heads 2..n only: moving the stem, head 1 or the shared
embed_out/embed_in towards agreement would change head 1 itself (the teacher),
so its gradient reaches heads 2..n's own weights and nothing else, whatever
LR_MB is (tests/test_distill.py hooks the stem to make sure).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from dynamo_export.losses import head1_distillation_kl, multi_token_loss


class GradientSources(NamedTuple):
    """The parameters each source moves, in the model's parameter order."""

    head1: list[torch.nn.Parameter]  # head 1's loss: every base weight (LR_B)
    heads: list[torch.nn.Parameter]  # heads 2..n's loss, CE and KL: their own weights (LR_M)
    shared: list[torch.nn.Parameter]  # heads 2..n's CE: the base weights they read (LR_MB); [] if LR_MB = 0


class StepGrads(NamedTuple):
    ce: torch.Tensor  # (n,) detached: head i's mean cross-entropy at index i-1
    kl: torch.Tensor  # (n-1,) detached: KL(p_1 || p_i) for heads 2..n, empty without distillation
    head1: list[torch.Tensor]  # gradients of `GradientSources.head1`
    heads: list[torch.Tensor]  # gradients of `GradientSources.heads + GradientSources.shared`


# (loss, params, retain_graph) -> d loss / d params: how a source's gradient is taken.
GradientFn = Callable[[torch.Tensor, Sequence[torch.nn.Parameter], bool], list[torch.Tensor]]


def autograd_gradients(loss: torch.Tensor, params, retain_graph: bool = False) -> list[torch.Tensor]:
    """One source's gradient without touching `.grad` (one process, or replicated ranks)."""
    return list(torch.autograd.grad(loss, params, retain_graph=retain_graph))


def new_head_parameters(model) -> list[torch.nn.Parameter]:
    """Heads 2..n's own parameters (decoder layer + final layer norm): where the KL term may go."""
    return [p for head in model.heads[1:] for p in head.parameters()]


def gradient_sources(model, lr_mb: float) -> GradientSources:
    """Who moves what: head 1's loss every base weight; heads 2..n's their own and, if LR_MB > 0, the shared."""
    new = {id(p) for p in new_head_parameters(model)}
    head1_own = {id(p) for p in model.heads[0].parameters()}
    base = [p for p in model.parameters() if id(p) not in new]
    shared = [p for p in base if id(p) not in head1_own] if lr_mb > 0 and new else []
    return GradientSources(base, new_head_parameters(model), shared)


def source_gradients(
    first: torch.Tensor,
    rest: torch.Tensor | None,
    tokens: torch.Tensor,
    sources: GradientSources,
    distill: float,
    temperature: float,
    accum: int = 1,
    grad: GradientFn = autograd_gradients,
) -> StepGrads:
    """Each source's gradient of one micro-batch's loss divided by `accum`, and the loss parts.

    first, rest: head 1's and heads 2..n's logits (`DynaMoForCausalLM.source_logits`;
    rest is None for n = 1). The graph is freed at the end. distill == 0 is the
    plain modified-CLM objective: the heads' source is the sum of their CE.
    grad takes each source's gradient: `autograd_gradients`, or under FSDP
    (sharded parameters) `fsdp.backward_gradients`.
    """
    ce_1 = multi_token_loss(first[:, None], tokens).per_head  # (1,)
    head1 = grad(ce_1[0] / accum, sources.head1, rest is not None)
    if rest is None:
        if distill > 0:
            raise ValueError("distillation needs heads 2..n: this model has one head")
        return StepGrads(ce_1.detach(), ce_1.new_zeros(0), head1, [])
    ce_later = multi_token_loss(rest, tokens, first_head=2).per_head  # (n-1,)
    ce = torch.cat([ce_1, ce_later]).detach()
    if distill == 0:
        heads = grad(ce_later.sum() / accum, sources.heads + sources.shared, False)
        return StepGrads(ce, ce.new_zeros(0), head1, heads)
    kl = head1_distillation_kl(first, rest, temperature)  # (n-1,)
    mixed = ((1.0 - distill) * ce_later.sum() + distill * kl.sum()) / accum
    if not sources.shared:  # one pass: everything the heads' source moves is the heads' own
        heads = grad(mixed, sources.heads, False)
        return StepGrads(ce, kl.detach(), head1, heads)
    # The KL's gradient must stop at the heads' own weights, the CE's goes on into the shared ones.
    own = grad(mixed, sources.heads, True)
    shared = grad((1.0 - distill) * ce_later.sum() / accum, sources.shared, False)
    return StepGrads(ce, kl.detach(), head1, [*own, *shared])
