"""DynaMoForCausalLM: a GPT-NeoX stem with n token heads predicting t+1..t+n.

Data flow (docs/METHOD.md, "Model"):

    input_ids -> embed_in -> stem layers 0..L-2 -> stem_out
    head 1: stem_out -> base layer L-1 -> final LN ┐
    head i: stem_out -> extra layer     -> own LN  ├ stack (B, n, T, H) -> embed_out (one MatMul)
                                                   ┘
Every decoder layer is transformers' own `GPTNeoXLayer` and the rotary
embedding is `GPTNeoXRotaryEmbedding`, so head 1 is the base model bit for bit.
The KV cache is a tuple of plain (key, value) tensors per layer instead of a
transformers `Cache` object: that keeps `torch.onnx.export` free of Python
state and maps one-to-one onto the ONNX graph's `past_key_values.{i}.*` inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXRotaryEmbedding

from dynamo_export.checkpoint import convert_gpt_neox, load_dynamo, save_dynamo
from dynamo_export.config import DynaMoConfig

KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DynaMoOutput(ModelOutput):
    """`logits` (B, n, T, V): head i at index i-1; `past_key_values`: one (key, value) per cache layer."""

    logits: torch.Tensor | None = None
    past_key_values: tuple[KeyValue, ...] | None = None


class _TensorCache:
    """Duck-typed stand-in for transformers' `Cache` used by `GPTNeoXAttention`.

    The attention calls `update(key, value, layer_idx, kwargs)` and attends over
    what it returns; we concatenate the past tensors and remember the result as
    that layer's present. Nothing else of the Cache API is used by the layer.
    """

    def __init__(self, past: tuple[KeyValue, ...] | None, num_layers: int):
        self.past = past
        self.present: list[KeyValue | None] = [None] * num_layers

    def update(self, key, value, layer_idx, cache_kwargs=None):
        if self.past is not None:
            past_key, past_value = self.past[layer_idx]
            key = torch.cat([past_key, key], dim=-2)
            value = torch.cat([past_value, value], dim=-2)
        self.present[layer_idx] = (key, value)
        return key, value


def additive_attention_mask(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal + padding mask as the additive (B, 1, T, past+T) bias the eager/SDPA attention adds.

    Query t sits at absolute position past+t and may see key j when j <= past+t
    and attention_mask[b, j] == 1. Blocked entries get dtype's minimum (not -inf)
    so a fully padded row softmaxes to a uniform row instead of NaN.
    """
    total_len = attention_mask.shape[1]
    past_len = total_len - query_len
    query_pos = torch.arange(query_len, device=attention_mask.device) + past_len  # (T,)
    key_pos = torch.arange(total_len, device=attention_mask.device)  # (S,)
    causal = key_pos[None, :] <= query_pos[:, None]  # (T, S)
    allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, blocked)


class TokenHead(nn.Module):
    """One decoder layer + its final layer norm; all heads share `embed_out`."""

    def __init__(self, config: DynaMoConfig, layer_idx: int):
        super().__init__()
        self.layer = GPTNeoXLayer(config, layer_idx)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden, attention_bias, position_embeddings, cache):
        hidden = self.layer(
            hidden, attention_mask=attention_bias, position_embeddings=position_embeddings, layer_past=cache
        )[0]
        return self.final_layer_norm(hidden)


class DynaMoPreTrainedModel(PreTrainedModel):
    config_class = DynaMoConfig
    base_model_prefix = "dynamo"
    _no_split_modules: ClassVar[list[str]] = ["GPTNeoXLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """GPT-NeoX's initialisation (normal(0, initializer_range), LN = identity)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)


class DynaMoForCausalLM(DynaMoPreTrainedModel):
    """The DynaMo model; checkpoint I/O lives in `dynamo_export.checkpoint`."""

    def __init__(self, config: DynaMoConfig):
        super().__init__(config)
        num_stem = config.num_hidden_layers - 1
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.emb_dropout = nn.Dropout(config.hidden_dropout)
        self.stem = nn.ModuleList(GPTNeoXLayer(config, i) for i in range(num_stem))
        self.heads = nn.ModuleList(TokenHead(config, num_stem + j) for j in range(config.num_token_heads))
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary_emb = GPTNeoXRotaryEmbedding(config=config)
        # Where tokenizer files come from when saving (the source checkpoint), or None.
        self.tokenizer_dir = None
        self.post_init()

    @property
    def num_token_heads(self) -> int:
        return self.config.num_token_heads

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: tuple[KeyValue, ...] | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> DynaMoOutput:
        """`logits_to_keep` as in transformers: 0 every position, k > 0 the last k, a 1-D tensor those
        positions; the heads' states are cut before the unembedding, so the rows not kept cost nothing."""
        head_states, cache = self._head_states(
            input_ids, attention_mask, position_ids, past_key_values, use_cache
        )
        stacked = torch.stack(head_states, dim=1)  # (B, n, T, H)
        if isinstance(logits_to_keep, torch.Tensor):
            stacked = stacked.index_select(2, logits_to_keep)
        elif logits_to_keep:
            stacked = stacked[:, :, -logits_to_keep:]
        logits = self.embed_out(stacked)  # (B, n, kept, V): one MatMul shared by all heads

        presents = tuple(cache.present) if (cache is not None and use_cache) else None
        return DynaMoOutput(logits=logits, past_key_values=presents)

    def source_logits(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training's logits, one unembedding MatMul per gradient source (dynamo_export/distill.py).

        Head 1's (B, T, V) and heads 2..n's (B, n-1, T, V; None for n = 1): the
        values of `forward(input_ids).logits`, split after head 1. Kept apart,
        head 1's loss has no path through heads 2..n's layers or their rows of
        the unembedding, so its backward skips them instead of carrying zeros.
        """
        head_states, _ = self._head_states(input_ids, None, None, None, False)
        first = self.embed_out(head_states[0])  # (B, T, V)
        if len(head_states) == 1:
            return first, None
        return first, self.embed_out(torch.stack(head_states[1:], dim=1))  # (B, n-1, T, V)

    def _head_states(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        """Every head's state after its final layer norm, each (B, T, H), and the cache (None without one)."""
        batch, seq = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[-2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            # Left padding shifts positions; without padding this is arange(past, past+T).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]

        hidden = self.emb_dropout(self.embed_in(input_ids))  # (B, T, H)
        attention_bias = additive_attention_mask(attention_mask, seq, hidden.dtype)  # (B, 1, T, past+T)
        rotary = self.rotary_emb(hidden, position_ids)  # cos, sin: (B, T, rotary_dim)
        cache = (
            _TensorCache(past_key_values, self.config.num_cache_layers)
            if (use_cache or past_key_values is not None)
            else None
        )

        for layer in self.stem:
            hidden = layer(
                hidden, attention_mask=attention_bias, position_embeddings=rotary, layer_past=cache
            )[0]
        return [head(hidden, attention_bias, rotary, cache) for head in self.heads], cache

    # -- checkpoint I/O (implemented in dynamo_export.checkpoint) --------------------------------

    @classmethod
    def from_gpt_neox(cls, path_or_model, num_token_heads: int = 3, head_init: str = "random"):
        """Build a DynaMo model from a GPT-NeoX (Pythia) checkpoint directory or instance."""
        return convert_gpt_neox(cls, path_or_model, num_token_heads=num_token_heads, head_init=head_init)

    @classmethod
    def from_pretrained(cls, path, torch_dtype: torch.dtype | None = None, **unused):
        """Load a DynaMo checkpoint directory (config.json + model.safetensors), strictly checked."""
        if unused:
            raise TypeError(f"unsupported from_pretrained options: {sorted(unused)}")
        return load_dynamo(cls, path, dtype=torch_dtype)

    def save_pretrained(
        self, save_directory, overwrite: bool = False, dtype: torch.dtype | None = None, **unused
    ):
        """Save atomically; an existing directory is replaced only with overwrite=True."""
        if unused:
            raise TypeError(f"unsupported save_pretrained options: {sorted(unused)}")
        return save_dynamo(self, save_directory, overwrite=overwrite, dtype=dtype)
