"""The three learning rates as optimizers: one AdamW per gradient source (docs/METHOD.md, "Training").

Head 1's loss moves the base weights at LR_B; heads 2..n's loss moves their own
weights at LR_M and the base weights they read at LR_MB, each source with its
own Adam state, clipping and accumulation (dynamo_export/training.py's module
docstring says why). The schedule multiplies all three rates.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from dynamo_export.distill import GradientSources, StepGrads, gradient_sources
from dynamo_export.distributed import ProcessGroup
from dynamo_export.fsdp import full_tensor, shard_like
from dynamo_export.train_config import TrainConfig

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def param_groups(sources: GradientSources, cfg: TrainConfig) -> dict[str, list[dict]]:
    """AdamW groups per gradient source; matrices and embeddings decay, biases and layer norms do not.

    head1: base, base_no_decay (LR_B). heads: heads, heads_no_decay (LR_M) and,
    when LR_MB > 0, shared (LR_MB, no decay: base weights decay in head 1's
    step only). Empty groups and sources (heads for n = 1) are left out.
    """

    def split(params, name, lr_name):
        groups = []
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "lr": getattr(cfg, lr_name),
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                        "name": name if decay else f"{name}_no_decay",
                        "lr_name": lr_name,
                    }
                )
        return groups

    heads = split(sources.heads, "heads", "lr_m")
    if sources.shared:
        heads.append(
            {
                "params": sources.shared,
                "lr": cfg.lr_mb,
                "weight_decay": 0.0,
                "name": "shared",
                "lr_name": "lr_mb",
            }
        )
    groups = {"head1": split(sources.head1, "base", "lr_b"), "heads": heads}
    return {source: g for source, g in groups.items() if g}


def lr_multiplier(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine down to exactly 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ThreeRateAdamW:
    """LR_B, LR_M and LR_MB as one torch AdamW per gradient source (module docstring).

    Per optimizer step: `accumulate` every micro-batch's `StepGrads`, then
    `step(k)`, which sets the rates of step k (the schedule), averages each
    source's gradient over the ranks of `group` (a no-op in one process; FSDP's
    sharded gradients arrive averaged by its reduce-scatter), hands it to its
    AdamW through `.grad`, clips and steps it, and clears `.grad` again, head
    1's source first. Parameters may be FSDP's sharded DTensors (dynamo_export/fsdp.py):
    the state dicts are full (unsharded) either way.
    """

    def __init__(self, model, cfg: TrainConfig, group: ProcessGroup | None = None):
        self.cfg = cfg
        self.group = group or ProcessGroup()
        self.sources = gradient_sources(model, cfg.lr_mb)
        # The order of each source's gradients in StepGrads.
        self.params = {"head1": self.sources.head1, "heads": self.sources.heads + self.sources.shared}
        self.optimizers = {
            source: torch.optim.AdamW(groups, betas=ADAM_BETAS, eps=ADAM_EPS)
            for source, groups in param_groups(self.sources, cfg).items()
        }
        self.rate_names = ("lr_b", "lr_m", "lr_mb") if self.sources.heads else ("lr_b",)
        self.grads: dict[str, list[torch.Tensor]] = {}

    def rates(self, step: int) -> dict[str, float]:
        """The learning rates of optimizer step `step` (from 0): the schedule times the peak rates."""
        multiplier = lr_multiplier(step, self.cfg.steps, self.cfg.warmup_steps)
        return {name: getattr(self.cfg, name) * multiplier for name in self.rate_names}

    def accumulate(self, grads: StepGrads) -> None:
        for source, new in (("head1", grads.head1), ("heads", grads.heads)):
            if source not in self.optimizers:
                continue
            held = self.grads.get(source)
            if held is None:
                self.grads[source] = list(new)
            else:
                for total, grad in zip(held, new, strict=True):
                    total.add_(grad)

    def step(self, step: int) -> dict[str, float] | None:
        """Apply the accumulated gradients; returns each source's norm before clipping (None: no clipping)."""
        rates = self.rates(step)
        norms = {}
        for source, optimizer in self.optimizers.items():  # head1 first: it applies the base weights' decay
            params, grads = self.params[source], self.grads.pop(source)
            if not isinstance(grads[0], DTensor):  # FSDP's reduce-scatter has averaged sharded ones
                self.group.average_(grads)  # the global batch's gradient, before clipping sees its norm
            for group in optimizer.param_groups:
                group["lr"] = rates[group["lr_name"]]
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            if self.cfg.clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip)  # of all shards together
                norms[source] = float(full_tensor(norm))
            optimizer.step()
            for param in params:
                param.grad = None
        return norms or None

    def state_dict(self, keep: bool = True) -> dict[str, dict] | None:
        """Each source's AdamW state, full and on the CPU (a one-process checkpoint's, whatever the sharding).

        Sharded states are gathered tensor by tensor, a collective every rank
        must join; a rank with keep=False only takes part and gets None, so
        only the writing rank holds the whole state in host memory.
        """

        def gathered(value: torch.Tensor) -> torch.Tensor | None:
            value = full_tensor(value)  # every rank joins the all-gather
            return value.cpu() if keep else None

        full = {}
        for source, optimizer in self.optimizers.items():
            state = optimizer.state_dict()
            entries = {
                index: {name: gathered(value) for name, value in entry.items()}
                for index, entry in state["state"].items()
            }
            full[source] = {**state, "state": entries}
        return full if keep else None

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Load full states (`state_dict`'s), each tensor cut to its parameter's shard under FSDP."""
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"it holds the gradient sources {sorted(state)}, this run has {sorted(self.optimizers)}"
            )
        for source, optimizer in self.optimizers.items():
            params = [
                param for group in optimizer.param_groups for param in group["params"]
            ]  # state's indices
            unknown = sorted(set(map(int, state[source]["state"])) - set(range(len(params))))
            if unknown:
                raise ValueError(f"{source} holds state for parameters {unknown[:5]} this run does not have")
            entries = {
                index: {name: shard_like(value, params[int(index)]) for name, value in entry.items()}
                for index, entry in state[source]["state"].items()
            }
            optimizer.load_state_dict({**state[source], "state": entries})
