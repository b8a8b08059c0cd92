"""DynaMoConfig: a GPT-NeoX config plus the multi-token head settings.

Subclassing `GPTNeoXConfig` keeps every Pythia field (rotary_pct, parallel
residual, layer-norm eps...) with transformers' own defaults and validation, so
a Pythia `config.json` turns into a DynaMo one by adding two fields.
"""

from __future__ import annotations

from transformers import GPTNeoXConfig

HEAD_INITS = ("random", "copy")


class DynaMoConfig(GPTNeoXConfig):
    """GPT-NeoX fields + `num_token_heads` (n >= 1) + `head_init`.

    `num_hidden_layers` keeps the base model's meaning: stem layers 0..L-2 plus
    head 1's layer. The extra heads add `num_token_heads - 1` layers on top, so
    the model has `num_hidden_layers + num_token_heads - 1` KV-cache layers.
    """

    model_type = "dynamo_neox"

    def __init__(self, num_token_heads: int = 3, head_init: str = "random", **kwargs):
        if int(num_token_heads) < 1:
            raise ValueError(f"num_token_heads must be >= 1, got {num_token_heads}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        self.num_token_heads = int(num_token_heads)
        self.head_init = head_init
        super().__init__(**kwargs)
        if self.num_hidden_layers < 1:
            raise ValueError("num_hidden_layers must be >= 1: head 1 is the base model's last layer")

    @property
    def num_cache_layers(self) -> int:
        """Decoder layers that own a KV cache: stem + head 1 + extra heads."""
        return self.num_hidden_layers + self.num_token_heads - 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
