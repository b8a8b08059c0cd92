"""`dynamo-train --fsdp`: parameters, gradients and both AdamW states sharded over the ranks (FSDP2).

    torchrun --nproc_per_node=N -m dynamo_export.cli.train ... --fsdp --batch-size B   # B: the GLOBAL batch

Data parallelism (dynamo_export/distributed.py) keeps the whole model and both
AdamW states on every rank; `--fsdp` keeps 1/N of each, for models that do not
fit one device. Everything else stays as in one process: the same batches
(rank r reads its slice), per-source clipping, the three rates, the schedule.

- `shard_model`: `fully_shard` (torch.distributed.fsdp, FSDP2) on every stem
  layer, every token head and the root (embed_in, embed_out). Each parameter
  becomes a DTensor holding its rank's rows; a module's full weights exist only
  while it runs (all-gathered before its forward and again before its backward).
  `source_logits` is registered as a forward method, so training's logits
  all-gather like `forward`'s.
- `backward_gradients`: each gradient source's gradient (dynamo_export/distill.py)
  by its own `backward` instead of `torch.autograd.grad`. FSDP computes on
  all-gathered copies of the parameters and reduce-scatters their gradients
  into the sharded `.grad` from backward hooks, so `autograd.grad` with respect
  to the sharded parameters has nothing to differentiate. One `backward`
  per source (the graph retained until the last) yields that source's gradient
  of the global batch in `.grad`, already averaged over the ranks by FSDP's
  reduce-scatter: it is taken out of `.grad` and `.grad` is cleared before the
  next source, so each source keeps its own gradient, accumulation and AdamW
  state exactly as in one process. Per-source clipping works on the sharded
  gradients: `clip_grad_norm_` of DTensors all-reduces the norm.
- Checkpoints hold the full, unsharded state (`full_model`, and
  `ThreeRateAdamW.state_dict`, which gathers DTensors): the format one process
  writes, so a run resumes under any N, with or without --fsdp. Resuming shards
  the full optimizer state again (`ThreeRateAdamW.load_state_dict`).
- Validation runs on every rank through the sharded model (all ranks must join
  its all-gathers); the numbers are the same on each, and rank 0 logs them.

Cost against data parallelism: the weights are all-gathered once per forward
and once per backward pass, and a step runs 2 backward passes (3 with
distillation and LR_MB > 0), each reduce-scattering every gradient it reaches.
With one process (no torchrun) --fsdp shards over a one-rank group: the same
code path, nothing saved.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from dynamo_export.distill import GradientFn
from dynamo_export.distributed import ProcessGroup
from dynamo_export.errors import TrainingError
from dynamo_export.modeling import DynaMoForCausalLM


def shard_model(model: DynaMoForCausalLM, group: ProcessGroup) -> None:
    """Shard `model` (on the CPU, every rank the same) over the group's ranks onto its device, in place.

    Rank 0's weights are broadcast first, one tensor at a time (a full copy of
    one tensor at most on the device), so every rank shards the same model.
    """
    for param in model.parameters():
        group.broadcast_([param.data])
    mesh = init_device_mesh(group.device.type, (group.world_size,))
    for module in [*model.stem, *model.heads, model]:  # the root last: it takes what is left
        fully_shard(module, mesh=mesh)
    register_fsdp_forward_method(model, "source_logits")


def backward_gradients(model: DynaMoForCausalLM) -> GradientFn:
    """`distill.source_gradients`'s `grad` for a sharded model: one `backward` per gradient source.

    Returns the sharded gradients of `params`, averaged over the ranks; every
    other gradient the backward produced (weights the source does not move) is
    dropped, so `.grad` is empty between sources.
    """
    everything = list(model.parameters())

    def grad(loss: torch.Tensor, params, retain_graph: bool = False) -> list[torch.Tensor]:
        loss.backward(retain_graph=retain_graph)
        missing = [i for i, param in enumerate(params) if param.grad is None]
        if missing:
            raise TrainingError(
                f"the loss does not reach parameters {missing} of its gradient source under --fsdp: "
                "train without --fsdp, or report the model's layout"
            )
        grads = [param.grad for param in params]
        for param in everything:
            param.grad = None
        return grads

    return grad


def full_model(model: DynaMoForCausalLM) -> DynaMoForCausalLM | None:
    """The unsharded model on rank 0's CPU (None on the other ranks); every rank must call it.

    The weights are gathered one tensor at a time into rank 0's host memory
    (`cpu_offload`), so no device ever holds the whole model.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not state:  # not rank 0
        return None
    with torch.device("meta"):
        full = DynaMoForCausalLM(model.config)
    full.load_state_dict(state, strict=True, assign=True)
    full.rotary_emb = type(model.rotary_emb)(config=model.config)  # a buffer no state dict holds
    full.tokenizer_dir = model.tokenizer_dir
    return full


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to its full value (a collective); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor cut like `param` (this rank's rows of a sharded parameter); as it is for a plain one."""
    if not isinstance(param, DTensor) or tensor.shape != param.shape:  # e.g. AdamW's scalar step
        return tensor
    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
