"""Training checkpoints (OUT/checkpoints/step-N): the trainer's state beside the model, nothing pickled.

A step-N directory is a DynaMo checkpoint (loadable with
`DynaMoForCausalLM.from_pretrained`) plus:
- `trainer_state.safetensors`: the per-parameter tensors of each gradient
  source's AdamW (`optimizer.{source}.{index}.{exp_avg|exp_avg_sq|step}`, source
  `head1` or `heads`: a weight both sources move has a state in each) and the
  torch RNG state;
- `trainer_state.json`: step, data position, the TrainConfig and each source's
  param groups (plain numbers). The learning rates are a function of the step,
  so there is no scheduler state.
Nothing is pickled: tensors load with `safetensors.torch.load_file` and the
rest with `json`, so a checkpoint cannot run code when read (the guarantee
`torch.load(weights_only=True)` aims for, without torch.load at all). Each
checkpoint is built in a hidden sibling directory and renamed into place, so a
crash never leaves a half-written step-N.

Resuming checks that the saved TrainConfig matches the current one field by
field, except the bookkeeping fields in RESUMABLE_OVERRIDES. A field the saved
config lacks (a checkpoint written before the field existed) counts as the
field's default, which is always the behaviour from before it existed.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dynamo_export.errors import TrainingError
from runtime.atomic import atomic_directory, atomic_write_json

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_FORMAT = 2  # 1: one AdamW state for both gradient sources (LR_MB as a gradient scale)
# Fields that only steer bookkeeping; a resumed run may change them freely.
RESUMABLE_OVERRIDES = frozenset({"out", "val", "tokenizer", "eval_every", "eval_batches", "save_every"})


def save_checkpoint(directory: Path, model, optimizer_state: dict[str, dict], cfg, step: int) -> Path:
    """Write step-N atomically: `model` unsharded, `optimizer_state` the full `ThreeRateAdamW.state_dict()`."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state()
    sources = {}
    for source, opt_state in optimizer_state.items():
        state_keys = {}
        for index, entry in opt_state["state"].items():
            state_keys[str(index)] = sorted(entry)
            for name, value in entry.items():
                if not torch.is_tensor(value):
                    raise TrainingError(
                        f"optimizer state {source}.{index}.{name} is not a tensor; cannot store it in safetensors"
                    )
                tensors[f"optimizer.{source}.{index}.{name}"] = value.detach().cpu().contiguous()
        sources[source] = {"param_groups": opt_state["param_groups"], "state_keys": state_keys}
    meta = {
        "format": STATE_FORMAT,
        "step": step,
        "data_position": step * cfg.grad_accum,
        "config": asdict(cfg),
        "optimizer": sources,
    }
    with atomic_directory(directory, overwrite=True) as tmp:
        model.save_pretrained(tmp, overwrite=True)
        save_file(tensors, tmp / STATE_TENSORS)
        atomic_write_json(tmp / STATE_JSON, meta)
    return directory


def checkpoint_steps(out: Path) -> dict[int, Path]:
    found = {}
    for path in (out / "checkpoints").glob("step-*"):
        if path.is_dir() and path.name[5:].isdigit():
            found[int(path.name[5:])] = path
    return found


def read_checkpoint_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{path} is not a training checkpoint ({STATE_JSON} unreadable: {exc})") from exc
    if meta.get("format") == 1:
        raise TrainingError(
            f"{path} was written by the trainer that realised LR_MB as a gradient scale (format 1, one AdamW "
            "state for both gradient sources); it cannot be continued exactly under per-source AdamW state: "
            f"start a new --out (with --model {path} to start from its weights)"
        )
    if meta.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}/{STATE_JSON} has format {meta.get('format')!r}, expected {STATE_FORMAT}")
    return meta


def check_resumable(saved: dict, cfg, path: Path) -> None:
    """A resumed run must continue the same trajectory: list every field that would change it."""
    current = json.loads(json.dumps(asdict(cfg)))
    changed = []
    for field in sorted(fields(cfg), key=lambda f: f.name):
        if field.name in RESUMABLE_OVERRIDES:
            continue
        default = None if field.default is MISSING else json.loads(json.dumps(field.default))
        was = saved.get(field.name, default)
        if was != current[field.name]:
            changed.append(f"{field.name}: checkpoint {was!r} vs now {current[field.name]!r}")
    if changed:
        raise TrainingError(
            f"cannot resume from {path}: the run's settings changed ({'; '.join(changed)}); "
            "resume with the original settings or start a new --out"
        )


def load_trainer_state(path: Path, meta: dict, optimizer) -> None:
    """Restore each source's AdamW state and the RNG from a checkpoint (safetensors + JSON, no unpickling)."""
    try:
        tensors = load_file(path / STATE_TENSORS)
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
        raise TrainingError(f"{path}/{STATE_TENSORS} is not a readable safetensors file: {exc}") from exc
    state = {}
    for source, saved in meta["optimizer"].items():
        groups = [{**g, "betas": tuple(g["betas"])} for g in saved["param_groups"]]
        per_param = {
            int(i): {name: tensors[f"optimizer.{source}.{i}.{name}"] for name in names}
            for i, names in saved["state_keys"].items()
        }
        state[source] = {"state": per_param, "param_groups": groups}
    try:
        optimizer.load_state_dict(state)
    except ValueError as exc:
        raise TrainingError(f"optimizer state in {path} does not fit the model: {exc}") from exc
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
