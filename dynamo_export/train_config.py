"""`TrainConfig`: everything a training run depends on, and the check of its settings.

Its own module because the trainer (training.py) and the per-source AdamW
(three_rates.py) both read it, and the trainer uses the optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynamo_export.errors import TrainingError


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint and in OUT/final."""

    train: str
    val: str
    out: str
    model: str | None = None  # GPT-NeoX (converted) or DynaMo (loaded) checkpoint ...
    init_config: dict | None = None  # ... or GPT-NeoX sizes for a fresh random base
    num_token_heads: int | None = None  # None: 3 when converting, the checkpoint's n, 1 for a fresh base
    head_init: str = "random"
    tokenizer: str | None = None  # tokenizer.json (or its directory) to carry into the output
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr_b: float = 1e-5
    lr_m: float = 1e-3
    lr_mb: float = 1e-6
    warmup_frac: float = 0.01
    weight_decay: float = 0.01
    clip: float = 1.0  # max gradient norm; 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 500
    seed: int = 0
    distill: float = 0.0  # W: heads 2..n train on (1 - W) CE + W KL(p_1 || p_i); 0 = plain modified CLM
    distill_temperature: float = 1.0  # T of both distributions in the KL

    def check(self) -> None:
        """Reject impossible settings up front, naming the option to fix."""
        problems = []
        if (self.model is None) == (self.init_config is None):
            problems.append(
                "give exactly one of --model (a checkpoint) or --init-config/--layers (a fresh base)"
            )
        for name in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "steps",
            "eval_every",
            "eval_batches",
            "save_every",
        ):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_token_heads is not None and self.num_token_heads < 1:
            problems.append(f"--num-token-heads must be >= 1, got {self.num_token_heads}")
        if self.lr_b <= 0 or self.lr_m < 0 or self.lr_mb < 0:
            problems.append(
                f"need --lr-b > 0, --lr-m >= 0, --lr-mb >= 0; got {self.lr_b}, {self.lr_m}, {self.lr_mb}"
            )
        if not 0 <= self.warmup_frac < 1:
            problems.append(f"--warmup-frac must lie in [0, 1), got {self.warmup_frac}")
        if self.clip < 0 or self.weight_decay < 0:
            problems.append(
                f"--clip and --weight-decay must be >= 0, got {self.clip} and {self.weight_decay}"
            )
        if not 0 <= self.distill <= 1:  # also rejects NaN
            problems.append(f"--distill is a mixing weight and must lie in [0, 1], got {self.distill}")
        if not 0 < self.distill_temperature < math.inf:
            problems.append(f"--distill-temperature must be > 0 and finite, got {self.distill_temperature}")
        if problems:
            raise TrainingError("invalid training configuration: " + "; ".join(problems))

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_frac * self.steps)
