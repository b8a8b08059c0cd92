"""Checkpoint I/O: Pythia/GPT-NeoX -> DynaMo conversion, DynaMo save and load.

The model class is a parameter, not an import: DynaMoForCausalLM's own
`from_gpt_neox` / `from_pretrained` / `save_pretrained` call these functions, so the
model definition (modeling.py) stands above its checkpoint I/O and not beside it.

Loading foreign weights is explicit (STYLE.md, nanoGPT): every GPT-NeoX tensor
has exactly one destination, key counts and shapes are asserted, and anything
missing, unexpected or mis-shaped is listed in the error. Weights are read with
safetensors only (no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedModel

from dynamo_export.config import HEAD_INITS, DynaMoConfig
from dynamo_export.errors import CheckpointError
from runtime.atomic import atomic_directory
from runtime.errors import DynaMoRuntimeError
from runtime.fingerprint import check_same_tokenizer, is_fingerprint, tokenizer_fingerprint

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _read_config_dict(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a checkpoint directory (config.json + weights)")
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a directory: pass a checkpoint directory (config.json + weights)"
        )
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}: it is not a Hugging Face checkpoint directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc


def checkpoint_kind(path: str | os.PathLike) -> str:
    """'dynamo' or 'gpt_neox'; anything else is rejected with the model_type it found."""
    model_type = _read_config_dict(Path(path)).get("model_type")
    if model_type == DynaMoConfig.model_type:
        return "dynamo"
    if model_type == "gpt_neox":
        return "gpt_neox"
    raise CheckpointError(
        f"{path}/config.json has model_type={model_type!r}; only GPT-NeoX (Pythia) checkpoints "
        f"('gpt_neox') and DynaMo checkpoints ('{DynaMoConfig.model_type}') are supported"
    )


def checkpoint_fingerprint(path: str | os.PathLike) -> str | None:
    """The tokenizer fingerprint of a checkpoint directory (runtime/fingerprint.py), None if unknown.

    Its tokenizer.json decides when it carries one (that file is what dynamo-export ships);
    otherwise config.json's `tokenizer_fingerprint`, which dynamo-train records from the
    token files it trained on, so a base trained without --tokenizer still has one.
    """
    path = Path(path)
    if (path / TOKENIZER_FILES[0]).is_file():
        try:
            return tokenizer_fingerprint(path / TOKENIZER_FILES[0])
        except DynaMoRuntimeError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    recorded = _read_config_dict(path).get("tokenizer_fingerprint")
    if recorded is not None and not is_fingerprint(recorded):
        raise CheckpointError(f"{path}/{CONFIG_NAME}: tokenizer_fingerprint must be 64 hex digits")
    return recorded


def dynamo_config_from_gpt_neox(base: GPTNeoXConfig, num_token_heads: int, head_init: str) -> DynaMoConfig:
    fields = base.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    return DynaMoConfig(num_token_heads=num_token_heads, head_init=head_init, **fields)


def gpt_neox_key_map(num_hidden_layers: int) -> dict[str, str]:
    """GPT-NeoX parameter prefix -> DynaMo prefix. Head 1 takes the last layer + final LN."""
    last = num_hidden_layers - 1
    mapping = {
        "gpt_neox.embed_in.": "embed_in.",
        "embed_out.": "embed_out.",
        "gpt_neox.final_layer_norm.": "heads.0.final_layer_norm.",
        f"gpt_neox.layers.{last}.": "heads.0.layer.",
    }
    mapping.update({f"gpt_neox.layers.{i}.": f"stem.{i}." for i in range(last)})
    return mapping


def _rename(key: str, mapping: dict[str, str]) -> str | None:
    for source, target in mapping.items():
        if key.startswith(source):
            return target + key[len(source) :]
    return None


def load_base_model(path_or_model) -> GPTNeoXForCausalLM:
    if isinstance(path_or_model, GPTNeoXForCausalLM):
        return path_or_model
    if isinstance(path_or_model, (str, os.PathLike)):
        if checkpoint_kind(path_or_model) != "gpt_neox":
            raise CheckpointError(
                f"{path_or_model} is already a DynaMo checkpoint: load it with DynaMoForCausalLM.from_pretrained"
            )
        try:
            return GPTNeoXForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"could not load GPT-NeoX weights from {path_or_model}: {exc}") from exc
    raise CheckpointError(
        f"from_gpt_neox takes a checkpoint directory or a GPTNeoXForCausalLM, got {type(path_or_model).__name__}"
    )


def convert_gpt_neox(
    model_class: type[PreTrainedModel], path_or_model, num_token_heads: int = 3, head_init: str = "random"
) -> PreTrainedModel:
    """A `model_class` (DynaMoForCausalLM) built from a GPT-NeoX checkpoint directory or instance."""
    if head_init not in HEAD_INITS:
        raise CheckpointError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
    base = load_base_model(path_or_model)
    config = dynamo_config_from_gpt_neox(base.config, num_token_heads, head_init)
    model = model_class(config)

    mapping = gpt_neox_key_map(config.num_hidden_layers)
    source = base.state_dict()
    converted, unmapped = {}, []
    for key, tensor in source.items():
        target = _rename(key, mapping)
        if target is None:
            unmapped.append(key)
        else:
            converted[target] = tensor.detach().to(torch.float32)
    if unmapped:
        raise CheckpointError(f"GPT-NeoX tensors with no DynaMo destination: {sorted(unmapped)}")

    if head_init == "copy":
        last_layer = {k[len("heads.0.") :]: v for k, v in converted.items() if k.startswith("heads.0.")}
        for j in range(1, num_token_heads):
            converted.update({f"heads.{j}.{k}": v.clone() for k, v in last_layer.items()})

    expected = model.state_dict()
    new_head_keys = {k for k in expected if _is_extra_head_key(k)} if head_init == "random" else set()
    _check_keys(converted, expected, skip=new_head_keys, source=str(getattr(base, "name_or_path", "model")))
    model.load_state_dict({**{k: expected[k] for k in new_head_keys}, **converted}, strict=True)
    tokenizer_dir = Path(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else None
    model.tokenizer_dir = tokenizer_dir
    if tokenizer_dir is not None:
        attach_fingerprint(model, checkpoint_fingerprint(tokenizer_dir))
    return model


def attach_fingerprint(model: PreTrainedModel, fingerprint: str | None) -> None:
    """Record a known tokenizer fingerprint in the model's config, so config.json carries it on save."""
    if fingerprint is not None:
        model.config.tokenizer_fingerprint = fingerprint


def adopt_tokenizer(
    model: PreTrainedModel, tokenizer_dir: str | os.PathLike, model_source: str | None
) -> None:
    """Give `model` the tokenizer in `tokenizer_dir` (dynamo-train --tokenizer), refusing another one than its own."""
    given = checkpoint_fingerprint(tokenizer_dir)
    check_same_tokenizer(
        getattr(model.config, "tokenizer_fingerprint", None),
        f"model {model_source}",
        given,
        f"--tokenizer {tokenizer_dir}",
        "pass the tokenizer the model was trained with, or drop --tokenizer to keep the model's own",
    )
    attach_fingerprint(model, given)


def _is_extra_head_key(key: str) -> bool:
    return key.startswith("heads.") and not key.startswith("heads.0.")


def _check_keys(found: dict, expected: dict, skip: set[str], source: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found) - skip)
    unexpected = sorted(set(found) - set(expected))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(found) & set(expected)
        if tuple(found[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(
            f"missing {len(missing)} tensors: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {unexpected[:10]}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} shape mismatches: {mis_shaped[:10]}")
    if problems:
        raise CheckpointError(
            f"{source} does not match its config.json ({len(found)} tensors found, "
            f"{len(expected) - len(skip)} expected): " + "; ".join(problems)
        )


def load_dynamo(
    model_class: type[PreTrainedModel], path: str | os.PathLike, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """A `model_class` (DynaMoForCausalLM) with the weights of a DynaMo checkpoint directory, strictly checked."""
    path = Path(path)
    if checkpoint_kind(path) != "dynamo":
        raise CheckpointError(
            f"{path} is a plain GPT-NeoX checkpoint: convert it with DynaMoForCausalLM.from_gpt_neox({str(path)!r})"
        )
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(
            f"{path} has no {WEIGHTS_NAME}: DynaMo checkpoints store weights in safetensors"
        )
    try:
        config = DynaMoConfig.from_pretrained(path)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}/{CONFIG_NAME} is not a valid DynaMo config: {exc}") from exc
    try:
        state = load_file(weights)
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
        raise CheckpointError(f"{weights} is not a readable safetensors file: {exc}") from exc
    model = model_class(config)
    _check_keys(state, model.state_dict(), skip=set(), source=str(weights))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    model.tokenizer_dir = path
    attach_fingerprint(model, checkpoint_fingerprint(path))
    return model.eval()


def save_dynamo(
    model: PreTrainedModel,
    directory: str | os.PathLike,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) atomically: temp dir, then rename."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise CheckpointError(f"{directory} already exists: choose another directory or pass overwrite=True")
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        source = getattr(model, "tokenizer_dir", None)
        if source is not None:
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file():
                    shutil.copy2(Path(source) / name, tmp / name)
    return directory


def save_gpt_neox(model, directory: str | os.PathLike, overwrite: bool = False) -> Path:
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


def _copy_tokenizer(model, directory: Path) -> None:
    source = getattr(model, "tokenizer_dir", None)
    for name in TOKENIZER_FILES if source is not None else ():
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, directory / name)
