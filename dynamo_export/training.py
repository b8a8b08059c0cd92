"""Modified-CLM training of a DynaMo model (docs/METHOD.md, "Training"), resumable bit for bit.

One code path trains both a DynaMo model from a GPT-NeoX/DynaMo checkpoint and
a plain GPT-NeoX base from scratch: a fresh base is a random
`GPTNeoXForCausalLM` converted with `from_gpt_neox`, and an n = 1 result is
written back as a transformers `GPTNeoXForCausalLM` checkpoint as well.

Learning rates (docs/METHOD.md, "Training"). A step has two gradient sources
(dynamo_export/distill.py): head 1's loss and heads 2..n's loss, each with its
own AdamW(0.9, 0.95, eps 1e-8). Head 1's moves the base weights (embed_in,
stem, head 1's layer + final LN, embed_out) at LR_B; the heads' moves their own
weights at LR_M and the base weights both read (embed_in, stem, the shared
embed_out) at LR_MB. A shared weight thus holds two Adam states, and its step
is the sum of an LR_B step on head 1's gradient and an LR_MB step on the
heads' gradient: Adam normalises each source by its own statistics, so the
rates are rates, not gradient scales. With LR_MB = 0 the heads' source never
touches (nor backpropagates into) the base weights, which then follow exactly
the trajectory head 1's loss alone gives (tests/test_training.py). Per source:
micro-batches accumulate separately and the gradient is clipped to `clip` by
its own norm. Weight decay (decoupled; matrices and embeddings, not biases or
layer norms: nanoGPT's rule) is applied once per weight, by the source that
owns it: LR_B's step for base weights (it runs first), LR_M's for heads 2..n.
The schedule, linear warm-up over `warmup_frac` of the steps then cosine to 0
at the last step, multiplies all three rates.

Data. Each micro-batch holds `batch_size` windows of seq_len + n tokens at
uniformly random offsets of the memmapped training file: the model reads the
first seq_len tokens and every head gets a label at each of the seq_len
positions. The offsets of micro-batch k come from a generator seeded with
(seed, k), so the sampler has no state: the data position is just k, the
number of micro-batches consumed (= step x grad_accum), and resuming at step s
replays exactly the batches an uninterrupted run would have seen.

Distillation (`distill` > 0, dynamo_export/distill.py): heads 2..n also learn
head 1's distribution, loss_i = (1 - W) CE_i + W KL(p_1 || p_i); the KL's
gradient reaches only their own weights, whatever LR_MB.

Checkpoints (OUT/checkpoints/step-N): dynamo_export/train_state.py; nothing is
pickled, and a step-N directory appears whole or not at all.

Several processes (`torchrun --nproc_per_node=N`, dynamo_export/distributed.py):
`batch_size` stays the global batch; rank r reads its contiguous slice of every
micro-batch, each source's gradient is averaged over the ranks before clipping,
and N processes train the model one would (up to float reduction order). Only
rank 0 writes; checkpoints hold the full state, so a run resumes under any N.
With `fsdp` (dynamo_export/fsdp.py) the ranks shard the weights and both AdamW
states instead of each holding all of them; same numbers, same checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dynamo_export.checkpoint import (
    adopt_tokenizer,
    attach_fingerprint,
    checkpoint_kind,
    save_gpt_neox,
)
from dynamo_export.distill import GradientFn, autograd_gradients, source_gradients
from dynamo_export.distributed import ProcessGroup
from dynamo_export.errors import TrainingError
from dynamo_export.evaluation import check_vocab, evaluate
from dynamo_export.fsdp import backward_gradients, full_model, shard_model
from dynamo_export.modeling import DynaMoForCausalLM
from dynamo_export.three_rates import ThreeRateAdamW
from dynamo_export.tokens import open_tokens
from dynamo_export.train_config import TrainConfig
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


# -- optimisation ----------------------------------------------------------------------------------


class WindowSampler:
    """Random training windows; micro-batch k depends only on (seed, k) — see the module docstring."""

    def __init__(self, ids: np.ndarray, window: int, batch_size: int, seed: int, rows: slice | None = None):
        if len(ids) < window:
            raise TrainingError(
                f"the training file holds {len(ids)} tokens, fewer than one window of {window}"
            )
        self.ids, self.window, self.batch_size, self.seed = ids, window, batch_size, seed
        self.rows = rows or slice(None)  # this rank's rows of the global batch (all of them in one process)

    def batch(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, len(self.ids) - self.window + 1, size=self.batch_size)[self.rows]
        rows = [np.asarray(self.ids[s : s + self.window], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(rows))  # (B / N, seq_len + n)


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
    fsdp: bool = False,
) -> Path:
    """Run (or resume) training; returns OUT/final, or the checkpoint written at `stop_at`.

    `stop_at` ends the run after that many optimizer steps with a checkpoint
    (for time-sliced jobs); rerunning with resume=True continues it exactly.
    Under torchrun every rank calls this and joins the process group
    (dynamo_export/distributed.py); without it the run is a single process.
    `fsdp` shards the model and optimizer over the ranks (dynamo_export/fsdp.py);
    it is not part of the TrainConfig, as a run may resume with or without it.
    """
    cfg.check()
    group = ProcessGroup.from_env(device, fsdp=fsdp)
    try:
        return _train(cfg, group, resume, stop_at, progress, fsdp)
    finally:
        group.close()


def _train(
    cfg: TrainConfig, group: ProcessGroup, resume: bool, stop_at: int | None, progress: bool, fsdp: bool
) -> Path:
    group.check_batch(cfg.batch_size)
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

    device = group.device
    model.train()
    if fsdp:
        shard_model(model, group)
    else:
        model.to(device)
        group.broadcast_([p.data for p in model.parameters()])  # one starting model, whatever each rank drew
    optimizer = ThreeRateAdamW(model, cfg, group)
    grad = backward_gradients(model) if fsdp else autograd_gradients
    start = 0
    if resume_from is not None:
        load_trainer_state(*resume_from, optimizer)
        start = resume_from[1]["step"]
    n = model.num_token_heads
    if cfg.distill > 0 and n < 2:
        raise TrainingError(
            f"--distill {cfg.distill} trains heads 2..n towards head 1, but this model has one head: "
            "drop --distill or give --num-token-heads >= 2"
        )
    sampler = WindowSampler(
        train_ids, cfg.seq_len + n, cfg.batch_size, cfg.seed, rows=group.shard_rows(cfg.batch_size)
    )
    if stop_at is not None and not start < stop_at <= cfg.steps:
        raise TrainingError(f"--stop-at must lie in ({start}, {cfg.steps}] for this run, got {stop_at}")
    main = group.is_main  # the only rank that writes
    validates = main or fsdp  # a sharded model validates on every rank: all join its all-gathers
    if main:
        log = TrainLog(out / LOG_NAME, keep_through_step=start if resume else -1)
    if validates and start == 0:
        initial = _validate(model, val_ids, cfg)
        if main:
            log.write({"step": 0, "val_loss": initial})
            tqdm.write(validation_line(0, initial))

    end = cfg.steps if stop_at is None else stop_at
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (progress and main))
    report = TrainReport(bar, start, end, cfg.eval_every)
    for step in range(start, end):
        began = time.perf_counter()
        per_head, kl, grad_norm = train_step(model, optimizer, sampler, step, cfg, device, grad)
        elapsed = time.perf_counter() - began
        done = step + 1
        val_loss = None
        if validates and (done % cfg.eval_every == 0 or done == cfg.steps):
            val_loss = _validate(model, val_ids, cfg)
        if main:
            record = {"step": done, "lr": optimizer.rates(step), "train_loss": per_head}
            if cfg.distill > 0:
                record["train_kl"] = kl  # heads 2..n
            record["grad_norm"] = grad_norm  # per source
            record["tokens_per_s"] = cfg.batch_size * cfg.grad_accum * cfg.seq_len / elapsed  # all ranks
            if val_loss is not None:
                record["val_loss"] = val_loss
            log.write(record)
            report.step(record)
            bar.update()
        if done < cfg.steps and (done % cfg.save_every == 0 or done == stop_at):
            # Full state on rank 0 only: under FSDP every rank joins the gathers.
            unsharded, state = full_model(model) if fsdp else model, optimizer.state_dict(keep=main)
            if main:
                save_checkpoint(out / "checkpoints" / f"step-{done}", unsharded, state, cfg, done)
            group.barrier()  # every rank returns (or goes on) with the checkpoint on disk
    bar.close()
    if main:
        report.finish(out / LOG_NAME, out)
    if end < cfg.steps:
        return out / "checkpoints" / f"step-{end}"
    unsharded = full_model(model) if fsdp else model
    if main:
        _save_final(out, unsharded, cfg)
    group.barrier()
    return out / "final"


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


def train_step(
    model,
    optimizer: ThreeRateAdamW,
    sampler: WindowSampler,
    step: int,
    cfg: TrainConfig,
    device,
    grad: GradientFn = autograd_gradients,
):
    """Optimizer step `step` (from 0) over grad_accum micro-batches; `grad` takes each source's gradient.

    Returns (per-head mean CE (n,), heads 2..n's mean KL (n-1,; empty without
    distillation), each gradient source's norm before clipping or None), all of
    the global batch when several processes share it.
    """
    n = model.num_token_heads
    per_head = torch.zeros(n, dtype=torch.float64)
    kl = torch.zeros(n - 1 if cfg.distill > 0 else 0, dtype=torch.float64)
    for micro in range(cfg.grad_accum):
        window = sampler.batch(step * cfg.grad_accum + micro).to(device)  # (B, seq_len + n)
        first, rest = model.source_logits(window[:, : cfg.seq_len])  # (B, T, V), (B, n-1, T, V)
        grads = source_gradients(
            first, rest, window, optimizer.sources, cfg.distill, cfg.distill_temperature, cfg.grad_accum, grad
        )
        optimizer.accumulate(grads)
        per_head += grads.ce.double().cpu() / cfg.grad_accum
        kl += grads.kl.double().cpu() / cfg.grad_accum
    grad_norm = optimizer.step(step)
    optimizer.group.average_([per_head, kl])  # the global batch's losses (equal slices: mean of means)
    return per_head.tolist(), kl.tolist(), grad_norm


def _save_final(out: Path, model: DynaMoForCausalLM, cfg: TrainConfig) -> Path:
    """OUT/final (DynaMo, with train_config.json); for n = 1 also OUT/final-gpt-neox (transformers)."""
    final = out / "final"
    with atomic_directory(final, overwrite=True) as tmp:
        model.save_pretrained(tmp, overwrite=True)
        atomic_write_json(tmp / TRAIN_CONFIG_JSON, asdict(cfg))
    if model.num_token_heads == 1:
        save_gpt_neox(model, out / "final-gpt-neox", overwrite=True)
    return final
