"""Modified-CLM training of a DynaMo model (docs/METHOD.md, "Training"), resumable bit for bit.

One code path trains both a DynaMo model from a GPT-NeoX/DynaMo checkpoint and
a plain GPT-NeoX base from scratch: a fresh base is a random
`GPTNeoXForCausalLM` converted with `from_gpt_neox`, and an n = 1 result is
written back as a transformers `GPTNeoXForCausalLM` checkpoint as well.

Learning rates. AdamW(0.9, 0.95, eps 1e-8) with two LR groups: LR_B for the
transferred base weights (embed_in, stem, head 1's layer + final LN,
embed_out) and LR_M for heads 2..n. LR_MB is realised by scaling the gradient
on the stem-output branch into heads 2..n by LR_MB / LR_B
(`model.branch_grad_scale`): the stem is stepped at LR_B, so the heads' share
of its gradient arrives at the LR_MB rate, exactly so for SGD and in proportion
under Adam's normalisation [ours]. Matrices and embeddings get weight decay;
biases and layer norms do not (nanoGPT's rule). The schedule is linear warm-up
over `warmup_frac` of the steps, then cosine to 0 at the last step.

Data. Each micro-batch holds `batch_size` windows of seq_len + n tokens at
uniformly random offsets of the memmapped training file: the model reads the
first seq_len tokens and every head gets a label at each of the seq_len
positions. The offsets of micro-batch k come from a generator seeded with
(seed, k), so the sampler has no state: the data position is just k, the
number of micro-batches consumed (= step x grad_accum), and resuming at step s
replays exactly the batches an uninterrupted run would have seen.

Distillation (`distill` > 0, dynamo_export/distill.py): heads 2..n also learn
head 1's distribution, loss_i = (1 - W) CE_i + W KL(p_1 || p_i); the KL's
gradient reaches only their own weights.

Checkpoints (OUT/checkpoints/step-N): dynamo_export/train_state.py; nothing is
pickled, and a step-N directory appears whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dynamo_export.checkpoint import (
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    adopt_tokenizer,
    attach_fingerprint,
    checkpoint_kind,
    gpt_neox_key_map,
)
from dynamo_export.distill import backward_losses
from dynamo_export.errors import CheckpointError, TrainingError
from dynamo_export.evaluation import check_vocab, evaluate
from dynamo_export.modeling import DynaMoForCausalLM
from dynamo_export.tokens import open_tokens
from dynamo_export.train_report import TrainReport, validation_line
from dynamo_export.train_state import (
    check_resumable,
    checkpoint_steps,
    load_trainer_state,
    read_checkpoint_meta,
    save_checkpoint,
)
from runtime.atomic import atomic_directory, atomic_write_json, atomic_write_text

TRAIN_CONFIG_JSON = "train_config.json"
LOG_NAME = "train_log.jsonl"
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


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


# -- model -----------------------------------------------------------------------------------------


def fresh_gpt_neox_config(sizes: dict, vocab_size: int, eot_id: int) -> GPTNeoXConfig:
    """GPT-NeoX config from a sizes dict (GPTNeoXConfig field names); Pythia-style defaults for the rest.

    Defaults: intermediate 4 x hidden, vocab from the token file, bos = eos = the
    end-of-text id, transformers' GPT-NeoX defaults (rotary_pct 0.25, parallel
    residual, untied embeddings, context 2048) otherwise.
    """
    known = set(GPTNeoXConfig().to_dict())
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise TrainingError(f"--init-config has keys that are not GPT-NeoX config fields: {unknown}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in sizes]
    if missing:
        raise TrainingError(f"--init-config must give {missing} (or use --hidden/--layers/--heads)")
    fields_ = {
        "intermediate_size": 4 * int(sizes["hidden_size"]),
        "vocab_size": vocab_size,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        **sizes,
    }
    try:
        return GPTNeoXConfig(**fields_)
    except ValueError as exc:
        raise TrainingError(f"--init-config describes an invalid GPT-NeoX model: {exc}") from exc


def tokenizer_directory(path: str | os.PathLike) -> Path:
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if not (directory / "tokenizer.json").is_file():
        raise TrainingError(f"--tokenizer {path}: no tokenizer.json there (pass the file or its directory)")
    return directory


def build_model(cfg: TrainConfig, vocab_size: int, eot_id: int) -> DynaMoForCausalLM:
    """The starting model, drawn from the torch RNG (seed it first): converted, loaded or fresh."""
    n = cfg.num_token_heads
    if cfg.init_config is not None:
        base = GPTNeoXForCausalLM(fresh_gpt_neox_config(cfg.init_config, vocab_size, eot_id))
        model = DynaMoForCausalLM.from_gpt_neox(base, num_token_heads=n or 1, head_init=cfg.head_init)
    elif checkpoint_kind(cfg.model) == "gpt_neox":
        model = DynaMoForCausalLM.from_gpt_neox(cfg.model, num_token_heads=n or 3, head_init=cfg.head_init)
    else:
        model = DynaMoForCausalLM.from_pretrained(cfg.model)
        if n is not None and n != model.num_token_heads:
            raise TrainingError(
                f"{cfg.model} is a DynaMo model with {model.num_token_heads} heads, not --num-token-heads {n}: "
                "drop the option, or start from its GPT-NeoX base"
            )
    if cfg.tokenizer is not None:
        model.tokenizer_dir = tokenizer_directory(cfg.tokenizer)
    return model


def save_gpt_neox(model: DynaMoForCausalLM, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an n = 1 DynaMo model as a plain transformers GPTNeoXForCausalLM checkpoint (atomically).

    The inverse of `checkpoint.gpt_neox_key_map`: stem.i -> gpt_neox.layers.i,
    heads.0.layer -> gpt_neox.layers.{L-1}, heads.0.final_layer_norm ->
    gpt_neox.final_layer_norm. The key set and shapes are checked against a
    GPTNeoXForCausalLM built on the meta device, so the file always loads.
    """
    if model.num_token_heads != 1:
        raise CheckpointError(
            f"only an n = 1 model is a plain GPT-NeoX model; this one has {model.num_token_heads} heads"
        )
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise CheckpointError(f"{directory} already exists: choose another directory or pass overwrite=True")
    fields_ = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "num_token_heads", "head_init"):
        fields_.pop(key, None)
    config = GPTNeoXConfig(**fields_, architectures=["GPTNeoXForCausalLM"])
    inverse = {dynamo: neox for neox, dynamo in gpt_neox_key_map(config.num_hidden_layers).items()}
    state = {}
    for key, tensor in model.state_dict().items():
        prefix = next(p for p in inverse if key.startswith(p))
        state[inverse[prefix] + key[len(prefix) :]] = tensor.detach().cpu().contiguous()
    with torch.device("meta"):
        expected = GPTNeoXForCausalLM(config).state_dict()
    wrong = sorted(set(state) ^ set(expected)) + sorted(
        k for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    if wrong:
        raise CheckpointError(f"GPT-NeoX export does not match GPTNeoXForCausalLM: {wrong[:10]}")
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        _copy_tokenizer(model, tmp)
    return directory


def _copy_tokenizer(model: DynaMoForCausalLM, directory: Path) -> None:
    source = getattr(model, "tokenizer_dir", None)
    for name in TOKENIZER_FILES if source is not None else ():
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, directory / name)


# -- optimisation ----------------------------------------------------------------------------------


def param_groups(model: DynaMoForCausalLM, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: base (LR_B) vs new heads 2..n (LR_M), each split into decay / no-decay."""
    buckets: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        is_new_head = name.startswith("heads.") and not name.startswith("heads.0.")
        decay = param.dim() >= 2  # matrices and embeddings; not biases or layer norms
        buckets.setdefault(("lr_m" if is_new_head else "lr_b", decay), []).append(param)
    groups = []
    for (lr_name, decay), params in buckets.items():
        groups.append(
            {
                "params": params,
                "lr": getattr(cfg, lr_name),
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "name": f"{'heads' if lr_name == 'lr_m' else 'base'}{'' if decay else '_no_decay'}",
                "lr_name": lr_name,
            }
        )
    return groups


def lr_multiplier(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine down to exactly 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: DynaMoForCausalLM, cfg: TrainConfig):
    """The three learning rates: AdamW groups for LR_B / LR_M, the branch gradient scale for LR_MB."""
    model.branch_grad_scale = cfg.lr_mb / cfg.lr_b
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=ADAM_BETAS, eps=ADAM_EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.steps, cfg.warmup_steps)
    )
    return optimizer, scheduler


class WindowSampler:
    """Random training windows; micro-batch k depends only on (seed, k) — see the module docstring."""

    def __init__(self, ids: np.ndarray, window: int, batch_size: int, seed: int):
        if len(ids) < window:
            raise TrainingError(
                f"the training file holds {len(ids)} tokens, fewer than one window of {window}"
            )
        self.ids, self.window, self.batch_size, self.seed = ids, window, batch_size, seed

    def batch(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, len(self.ids) - self.window + 1, size=self.batch_size)
        rows = [np.asarray(self.ids[s : s + self.window], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(rows))  # (B, seq_len + n)


# -- the loop --------------------------------------------------------------------------------------


class TrainLog:
    """OUT/train_log.jsonl, one JSON object per line; resuming drops lines past the checkpoint."""

    def __init__(self, path: Path, keep_through_step: int):
        self.path = path
        kept = []
        if path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= keep_through_step
            ]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _validate(model, val_ids, cfg: TrainConfig) -> list[float]:
    return evaluate(
        model, val_ids, cfg.seq_len, cfg.batch_size, max_batches=cfg.eval_batches, progress=False
    ).nll_per_head


def train(
    cfg: TrainConfig,
    resume: bool = False,
    stop_at: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Run (or resume) training; returns OUT/final, or the checkpoint written at `stop_at`.

    `stop_at` ends the run after that many optimizer steps with a checkpoint
    (for time-sliced jobs); rerunning with resume=True continues it exactly.
    """
    cfg.check()
    out = Path(cfg.out)
    train_ids, train_meta = open_tokens(cfg.train)
    val_ids, val_meta = open_tokens(cfg.val)
    model, resume_from = _starting_model(cfg, out, resume, train_meta)
    if cfg.tokenizer is not None:
        adopt_tokenizer(model, model.tokenizer_dir, cfg.model)
    for path, file_meta in ((cfg.train, train_meta), (cfg.val, val_meta)):
        check_vocab(
            file_meta,
            model.config,
            path,
            model_source=cfg.model or cfg.tokenizer or f"fresh base (tokens of {cfg.train})",
        )
        if getattr(model.config, "tokenizer_fingerprint", None) is None:  # a fresh base: its tokens decide
            attach_fingerprint(model, file_meta.tokenizer_fingerprint)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise TrainingError(
            f"--seq-len {cfg.seq_len} exceeds the model's context of {model.config.max_position_embeddings}"
        )

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).train()
    optimizer, scheduler = build_optimizer(model, cfg)
    start = 0
    if resume_from is not None:
        load_trainer_state(*resume_from, optimizer, scheduler)
        start = resume_from[1]["step"]
    n = model.num_token_heads
    if cfg.distill > 0 and n < 2:
        raise TrainingError(
            f"--distill {cfg.distill} trains heads 2..n towards head 1, but this model has one head: "
            "drop --distill or give --num-token-heads >= 2"
        )
    sampler = WindowSampler(train_ids, cfg.seq_len + n, cfg.batch_size, cfg.seed)
    if stop_at is not None and not start < stop_at <= cfg.steps:
        raise TrainingError(f"--stop-at must lie in ({start}, {cfg.steps}] for this run, got {stop_at}")
    log = TrainLog(out / LOG_NAME, keep_through_step=start if resume else -1)
    if start == 0:
        initial = _validate(model, val_ids, cfg)
        log.write({"step": 0, "val_loss": initial})
        tqdm.write(validation_line(0, initial))

    end = cfg.steps if stop_at is None else stop_at
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress)
    report = TrainReport(bar, start, end, cfg.eval_every)
    for step in range(start, end):
        began = time.perf_counter()
        lrs = {g["lr_name"]: g["lr"] for g in optimizer.param_groups}
        per_head, kl, grad_norm = train_step(model, optimizer, sampler, step, cfg, device)
        scheduler.step()
        done = step + 1
        record = {"step": done, "lr": lrs, "train_loss": per_head}
        if cfg.distill > 0:
            record["train_kl"] = kl  # heads 2..n
        record["grad_norm"] = grad_norm
        record["tokens_per_s"] = cfg.batch_size * cfg.grad_accum * cfg.seq_len / (time.perf_counter() - began)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            record["val_loss"] = _validate(model, val_ids, cfg)
        log.write(record)
        report.step(record)
        bar.update()
        if done < cfg.steps and (done % cfg.save_every == 0 or done == stop_at):
            save_checkpoint(out / "checkpoints" / f"step-{done}", model, optimizer, scheduler, cfg, done)
    bar.close()
    report.finish(out / LOG_NAME, out)
    if end < cfg.steps:
        return out / "checkpoints" / f"step-{end}"
    return _save_final(out, model, cfg)


def _starting_model(cfg: TrainConfig, out: Path, resume: bool, train_meta) -> tuple:
    """(model, None) for a new run; (model, (checkpoint dir, its trainer_state.json)) when resuming."""
    checkpoints = checkpoint_steps(out)
    if not resume:
        if checkpoints or (out / "final").exists():
            raise TrainingError(
                f"{out} already holds a run: pass --resume to continue it or choose another --out"
            )
        torch.manual_seed(cfg.seed)
        return build_model(cfg, train_meta.vocab_size, train_meta.eot_id), None
    if not checkpoints:
        raise TrainingError(f"--resume: {out}/checkpoints holds no step-N checkpoint to resume from")
    path = checkpoints[max(checkpoints)]
    meta = read_checkpoint_meta(path)
    check_resumable(meta["config"], cfg, path)
    model = DynaMoForCausalLM.from_pretrained(path)
    if cfg.tokenizer is not None:
        model.tokenizer_dir = tokenizer_directory(cfg.tokenizer)
    return model, (path, meta)


def train_step(model, optimizer, sampler: WindowSampler, step: int, cfg: TrainConfig, device):
    """One optimizer step over grad_accum micro-batches.

    Returns (per-head mean CE (n,), heads 2..n's mean KL (n-1,; empty without
    distillation), grad norm before clipping or None).
    """
    optimizer.zero_grad(set_to_none=True)
    n = model.num_token_heads
    per_head = torch.zeros(n, dtype=torch.float64)
    kl = torch.zeros(n - 1 if cfg.distill > 0 else 0, dtype=torch.float64)
    for micro in range(cfg.grad_accum):
        window = sampler.batch(step * cfg.grad_accum + micro).to(device)  # (B, seq_len + n)
        logits = model(window[:, : cfg.seq_len]).logits  # (B, n, seq_len, V)
        losses = backward_losses(model, logits, window, cfg.distill, cfg.distill_temperature, cfg.grad_accum)
        per_head += losses.ce.double().cpu() / cfg.grad_accum
        kl += losses.kl.double().cpu() / cfg.grad_accum
    grad_norm = None
    if cfg.clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
    optimizer.step()
    return per_head.tolist(), kl.tolist(), grad_norm


def _save_final(out: Path, model: DynaMoForCausalLM, cfg: TrainConfig) -> Path:
    """OUT/final (DynaMo, with train_config.json); for n = 1 also OUT/final-gpt-neox (transformers)."""
    model.branch_grad_scale = 1.0
    final = out / "final"
    with atomic_directory(final, overwrite=True) as tmp:
        model.save_pretrained(tmp, overwrite=True)
        atomic_write_json(tmp / TRAIN_CONFIG_JSON, asdict(cfg))
    if model.num_token_heads == 1:
        save_gpt_neox(model, out / "final-gpt-neox", overwrite=True)
    return final
