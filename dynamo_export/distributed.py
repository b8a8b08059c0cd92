"""Data-parallel training over torchrun's processes: N ranks train the same model as one process would.

    torchrun --nproc_per_node=N -m dynamo_export.cli.train ... --batch-size B   # B: the GLOBAL batch

The trainer (dynamo_export/training.py) stays one code path; this module gives it
the few things that differ between 1 and N processes:
- `ProcessGroup.from_env`: joins the process group that torchrun's environment
  describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), gloo on CPU, nccl
  on CUDA (each rank on cuda:LOCAL_RANK). Without torchrun (or with one process)
  there is no process group at all and every collective below is a no-op, so a
  single-process run does exactly what it did before.
- Each rank reads its own contiguous slice of every global micro-batch
  (`shard_rows`): rank r takes rows [r B/N, (r+1) B/N). B must divide by N.
- `average_`: after a step's micro-batches, each gradient source's accumulated
  gradient is averaged over the ranks BEFORE clipping, so per-source clipping
  and both AdamW states see the gradient of the global batch. Every rank holds
  the full model and optimizer and applies the same update.

Why an explicit all-reduce and not DistributedDataParallel: the trainer takes
each source's gradient with its own `torch.autograd.grad` (dynamo_export/distill.py),
which returns gradients instead of accumulating them into `.grad`, so DDP's
hooks on `.grad` accumulation never fire, and DDP's one-bucketed-reduce-per-backward
cannot tell head 1's gradient of a shared weight from heads 2..n's (each must be
averaged and clipped on its own). Averaging each source's list of gradients
once per optimizer step (one flat all-reduce per source, as DDP with `no_sync`
over the accumulation micro-batches; a weight both sources move is sent once
per source) does what DDP would do. The mean of
the ranks' per-slice mean losses is the global mean loss (equal slices), so the
result equals one process up to float reduction order.

`--fsdp` (dynamo_export/fsdp.py) shards the weights and both AdamW states over
the same ranks instead of replicating them; this module still gives it the
process group, the slices and the rank-0-only writing.

Only rank 0 writes (checkpoints, OUT/final, the log, the plot, progress);
validation runs on rank 0 alone on its full model, so the logged numbers are
those of a one-process run. A checkpoint is the full model and both AdamW
states (as in one process): every rank loads it, so a run resumes under any N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dynamo_export.errors import TrainingError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the ranks; world_size 1 = a plain single-process run (no collectives)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = CPU
    owned: bool = False  # this object initialised torch.distributed and must tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str | None = None, fsdp: bool = False) -> ProcessGroup:
        """Join torchrun's process group (or one already initialised by the caller); none for one process.

        device: "cpu" or "cuda" (default: cuda when available); under N > 1 CUDA
        ranks, rank r uses cuda:LOCAL_RANK. fsdp: FSDP needs a process group even
        for one process, so one is made of this process alone (dynamo_export/fsdp.py).
        """
        kind = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dist.is_available() and dist.is_initialized():
            return cls._joined(kind, owned=False)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1 and not fsdp:
            return cls(device=kind)
        if not dist.is_available():
            raise TrainingError(
                "this torch build has no torch.distributed: run a single process without --fsdp"
            )
        backend = "nccl" if kind.type == "cuda" else "gloo"
        if world_size == 1:  # nothing to rendezvous with: an in-memory store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            return cls._joined(kind, owned=True)
        missing = [name for name in TORCHRUN_VARS if name not in os.environ]
        if missing:
            raise TrainingError(
                f"WORLD_SIZE={world_size} but {missing} are not set: launch with "
                "torchrun --nproc_per_node=N -m dynamo_export.cli.train ..."
            )
        dist.init_process_group(backend)
        return cls._joined(kind, owned=True)

    @classmethod
    def _joined(cls, kind: torch.device, owned: bool) -> ProcessGroup:
        if kind.type == "cuda" and kind.index is None:
            kind = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(kind)
        return cls(dist.get_rank(), dist.get_world_size(), kind, owned)

    def check_batch(self, batch_size: int) -> None:
        """The global batch is split into N equal contiguous slices: it must divide by N."""
        if batch_size % self.world_size:
            raise TrainingError(
                f"--batch-size {batch_size} (the global batch) does not divide by the {self.world_size} "
                f"processes: choose a multiple of {self.world_size} or another --nproc_per_node"
            )

    def shard_rows(self, batch_size: int) -> slice:
        """This rank's contiguous rows of a global batch of `batch_size`."""
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place (one flat all-reduce)."""
        if not self.distributed or not tensors:
            return
        flat = _flatten_dense_tensors(tensors).to(self.device)  # nccl reduces device tensors only
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        for tensor, mean in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
            tensor.copy_(mean)

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors (the starting weights, as DDP does at construction)."""
        if not self.distributed or not tensors:
            return
        flat = _flatten_dense_tensors(tensors).to(self.device)  # nccl broadcasts device tensors only
        dist.broadcast(flat, src=0)
        for tensor, value in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
            tensor.copy_(value)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
