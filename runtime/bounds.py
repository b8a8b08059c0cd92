"""How much memory one generate() call can take, known before its first pass.

A service sets `DynaMoRuntime.load(..., max_memory_bytes=...)` and every call
whose worst case exceeds it is refused up front (InputError), instead of
growing until the process is killed. Counted, for batch 1:

- KV cache: 2 (key, value) x cache layers x heads x head_dim x slots x the
  cache dtype's size, twice: during a pass the graph's new presents exist next
  to the pasts they extend (runtime/session.py swaps them after the pass).
  Slots: every fed token takes one. ar/dynamic feed the prompt and then every
  emitted token except the last pass's, so at most min(N - 1, C - P) after the
  P prompt tokens (N = max_new_tokens, C = context). verify feeds up to n
  tokens per later pass (the newest token and n - 1 drafts) and keeps the
  slots of rejected drafts, masked; every pass accepts at least one token, so
  at most n x min(N - 1, C - P).
- Logits: the graph returns every head's logits at every fed position, so the
  largest pass (the prefill of P tokens, or n in verify) holds
  n x max(P, n) x vocab x 4 bytes.

Not counted: the weights (fixed per loaded runtime) and ONNX Runtime's
transient activations inside a pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import InputError
from runtime.manifest import Manifest


@dataclass(frozen=True)
class CallMemory:
    cache_slots: int
    cache_bytes: int  # both copies alive during a pass
    logits_bytes: int

    @property
    def total(self) -> int:
        return self.cache_bytes + self.logits_bytes


def call_memory(manifest: Manifest, prompt_tokens: int, max_new_tokens: int, mode: str) -> CallMemory:
    """The worst case of one call (module docstring), from the manifest's shapes alone."""
    model = manifest.model
    n = model.num_token_heads
    later_passes = max(0, min(max_new_tokens - 1, model.context_length - prompt_tokens))
    slots = prompt_tokens + (n if mode == "verify" else 1) * later_passes
    per_slot = 2 * model.num_cache_layers * model.num_attention_heads * model.head_dim
    cache_item = np.dtype(manifest.graph.cache_dtype).itemsize
    logits_item = np.dtype(manifest.graph.logits_dtype).itemsize
    largest_pass = max(prompt_tokens, n if mode == "verify" else 1)
    return CallMemory(
        cache_slots=slots,
        cache_bytes=2 * slots * per_slot * cache_item,
        logits_bytes=n * largest_pass * model.vocab_size * logits_item,
    )


def check_call_memory(memory: CallMemory, limit: int) -> None:
    if memory.total > limit:
        raise InputError(
            f"this call could need {memory.total:,} bytes (KV cache {memory.cache_bytes:,} for "
            f"{memory.cache_slots} slots, logits {memory.logits_bytes:,}), over max_memory_bytes={limit:,}: "
            "shorten the prompt, lower max_new_tokens, or load the runtime with a larger max_memory_bytes"
        )
