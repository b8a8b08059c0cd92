"""DynaMoRuntime: load an exported artifact, then generate or stream from it.

    rt = DynaMoRuntime.load("out/reference-t3", provider="cpu")
    result = rt.generate("The os module", max_new_tokens=64, config=SamplingConfig(mode="dynamic"))
    print(result.text, result.stats.tokens_per_pass)

Everything is found through the manifest and checked before the first pass:
the files against their sizes and hashes, the graph's I/O against the
manifest, the tokenizer's and the masks' vocabularies against the graph's.
One loaded runtime serves concurrent calls from several threads: each call
gets its own cache, random state and stats (runtime/generation.py).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from runtime.artifact_files import read_artifact
from runtime.bounds import call_memory, check_call_memory
from runtime.config import SamplingConfig
from runtime.cooccurrence import CooccurrenceMask
from runtime.errors import ApproximateVerifyWarning, ArtifactError, GenerationTimeout, InputError
from runtime.fingerprint import check_artifact_masks
from runtime.generation import Decoder, GenerationStats
from runtime.graph_checks import check_graph, external_locations
from runtime.manifest import Manifest
from runtime.session import Deadline, GraphSession
from runtime.tokenizer_policy import call, parse_tokenizer


@dataclass(frozen=True)
class GenerationResult:
    text: str | None  # None when the artifact has no tokenizer
    token_ids: list[int]  # the new tokens only
    stats: GenerationStats


# Graphs whose logits at one fed position depend on the others fed with it (int8: ORT's dynamic
# quantization scales activations per tensor); verify on them is close to ar, not equal to it.
ROW_COUPLED_DTYPES = frozenset({"int8"})


class DynaMoRuntime:
    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        session: GraphSession,
        tokenizer: Tokenizer | None,
        masks: CooccurrenceMask | None,
        max_memory_bytes: int | None = None,
    ):
        self.root = root
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.masks = masks
        self.max_memory_bytes = max_memory_bytes  # per call; runtime/bounds.py says what counts
        self.default_config = SamplingConfig.from_manifest_defaults(manifest.sampling_defaults)

    @classmethod
    def load(
        cls,
        artifact_dir: str | os.PathLike,
        provider: str = "cpu",
        threads: int | None = None,
        check_hashes: bool = True,
        max_memory_bytes: int | None = None,
        verify_signature: str | os.PathLike | None = None,
    ) -> DynaMoRuntime:
        """Load and check an artifact (module docstring). `verify_signature`, the path of an
        elliptic-curve public key (PEM), also requires the artifact's model.sig to be that key's
        signature over every file as read, checked before any of them is used (runtime/signing.py;
        SignatureError otherwise)."""
        if max_memory_bytes is not None and (not _is_int(max_memory_bytes) or max_memory_bytes < 1):
            raise InputError(f"max_memory_bytes={max_memory_bytes!r} must be a positive integer or None")
        # Every file read once, from one pinned directory; the checks below and ONNX Runtime, the
        # tokenizer and the masks all get these same bytes (runtime/artifact_files.py).
        artifact = read_artifact(artifact_dir, check_hashes=check_hashes, verify_signature=verify_signature)
        root, manifest, files = artifact.root, artifact.manifest, artifact.files
        vocab = manifest.model.vocab_size
        tokenizer = None
        if manifest.tokenizer is not None:
            # the allow-list first (tokenizer_policy)
            tokenizer = parse_tokenizer(files[manifest.tokenizer], manifest.tokenizer)
            # Ids need not be dense (get_vocab_size counts entries): the largest one must fit the graph.
            top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
            if top >= vocab:
                raise ArtifactError(
                    f"the tokenizer's ids reach {top} but the graph has only {vocab} tokens: "
                    "they come from different models"
                )
        masks = None
        if manifest.cooccurrence is not None:
            masks = CooccurrenceMask.load(
                root / manifest.cooccurrence,
                expected_vocab_size=vocab,
                max_bytes=max_memory_bytes,
                contents=artifact.folder(manifest.cooccurrence),
            )
            check_artifact_masks(root, manifest.tokenizer_fingerprint, manifest.cooccurrence, masks.meta)
        graph = files[manifest.graph.file]
        data = files.get(manifest.graph.external_data) if manifest.graph.external_data else None
        # before ONNX Runtime reads a byte of it
        info = check_graph(root, manifest, graph, None if data is None else len(data))
        external = {location: data for location in external_locations(info)}
        session = GraphSession(graph, manifest, provider=provider, threads=threads, external_data=external)
        return cls(root, manifest, session, tokenizer, masks, max_memory_bytes)

    @property
    def provider(self) -> str:
        return self.session.provider

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        config: SamplingConfig | None = None,
        seed: int | None = None,
        time_limit_s: float | None = None,
    ) -> GenerationResult:
        pieces = list(self._decode(prompt, max_new_tokens, config, seed, time_limit_s))
        decoder = pieces[-1][1] if pieces else None
        ids = decoder.generated if decoder else []
        return GenerationResult(self._text(ids), list(ids), decoder.stats if decoder else GenerationStats())

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        config: SamplingConfig | None = None,
        seed: int | None = None,
        time_limit_s: float | None = None,
    ) -> Generator[str, None, GenerationStats]:
        """Yield text pieces as passes accept tokens; joined, they equal generate()'s text. The
        generator returns the call's stats (StopIteration.value) for a caller that wants them."""
        if self.tokenizer is None:
            raise InputError(
                "stream() yields text and this artifact has no tokenizer: use generate() with ids"
            )
        emitted, stats = "", GenerationStats()
        for _, decoder in self._decode(prompt, max_new_tokens, config, seed, time_limit_s):
            stats = decoder.stats
            text = self._text(decoder.generated)
            # A byte-level BPE token can end inside a UTF-8 character: wait for the rest of it.
            if text.endswith("\ufffd") and not decoder.stats.stop_reason:
                continue
            if len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
        return stats

    # -- internals ------------------------------------------------------------------------------

    def _decode(
        self, prompt, max_new_tokens, config, seed, time_limit_s
    ) -> Iterator[tuple[list[int], Decoder]]:
        config = config if config is not None else self.default_config
        if not isinstance(config, SamplingConfig):
            raise InputError(f"config must be a SamplingConfig, got {type(config).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens={str(max_new_tokens)[:40]} must be an integer >= 1")
        _check_seed(seed)
        _check_grid(config, self.manifest.model.num_token_heads)
        if config.mode == "verify" and self.manifest.graph.dtype in ROW_COUPLED_DTYPES:
            warnings.warn(
                f"verify on a {self.manifest.graph.dtype} graph only approximates ar: dynamic quantization "
                "scales the activations over every fed position, so head 1's logits shift with the drafts "
                "beside them; export --dtype fp32, fp16 or int4 for verify that samples exactly as ar",
                ApproximateVerifyWarning,
                stacklevel=3,
            )
        deadline = Deadline(time_limit_s)  # tokenizing the prompt counts against the limit too
        try:
            prompt_ids = self._prompt_ids(prompt)
            if deadline.expired:
                raise GenerationTimeout("tokenizing the prompt ran past the time limit")
            if self.max_memory_bytes is not None:
                memory = call_memory(self.manifest, len(prompt_ids), max_new_tokens, config.mode)
                check_call_memory(memory, self.max_memory_bytes)
            stop_ids, stop_strings = self._stops(config)
            decoder = Decoder(self.session, self.masks, config, seed, max_new_tokens, stop_ids, deadline)
            for accepted in decoder.run(prompt_ids):
                if stop_strings and self._cut_at_stop_string(decoder, stop_strings):
                    decoder.stop()
                yield accepted, decoder
        finally:
            deadline.cancel()

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("a text prompt needs a tokenizer and this artifact has none: pass token ids")
            ids = self._encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(t) for t in prompt] if all(_is_int(t) for t in prompt) else None
            if ids is None:
                raise InputError("a prompt given as a sequence must hold integer token ids")
        else:
            raise InputError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InputError("the prompt is empty: give at least one token")
        vocab = self.manifest.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InputError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        context = self.manifest.model.context_length
        if len(ids) >= context:
            raise InputError(
                f"the prompt has {len(ids)} tokens but the model's context is {context}: "
                "shorten the prompt to leave room for at least one new token"
            )
        return ids

    def _encode(self, prompt: str) -> list[int]:
        """The prompt's ids; refused before tokenizing when it cannot fit the context (every token
        covers at most the longest token's characters), or when it is not valid Unicode text."""
        limit = self.manifest.model.context_length * self._longest_token
        if len(prompt) > limit:
            raise InputError(
                f"the prompt has {len(prompt):,} characters, more than the model's context can hold: the "
                f"context is {self.manifest.model.context_length} tokens of at most {self._longest_token} "
                f"characters each ({limit:,}): shorten it"
            )
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                f"the prompt is not valid Unicode text ({exc.reason} at {exc.start}): fix its encoding"
            ) from exc
        return call(
            lambda: self.tokenizer.encode(prompt).ids, "the tokenizer failed on the prompt", InputError
        )

    @functools.cached_property
    def _longest_token(self) -> int:
        """Characters in the tokenizer's longest token (what one token can cover of a prompt)."""
        return max((len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

    def _stops(self, config: SamplingConfig) -> tuple[frozenset[int], tuple[str, ...]]:
        ids = {s for s in config.stop if not isinstance(s, str)}
        strings = tuple(s for s in config.stop if isinstance(s, str))
        if strings and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer and this artifact has none: give stop token ids")
        if self.manifest.model.eos_token_id is not None:
            ids.add(self.manifest.model.eos_token_id)
        return frozenset(ids), strings

    def _cut_at_stop_string(self, decoder: Decoder, stops: tuple[str, ...]) -> bool:
        """Drop the tokens after the one that completes a stop string; True if one matched."""
        text = self._text(decoder.generated)
        if not any(s in text for s in stops):
            return False
        for end in range(1, len(decoder.generated) + 1):
            if any(s in self._text(decoder.generated[:end]) for s in stops):
                del decoder.generated[end:]
                decoder.stats.new_tokens = end
                return True
        return True

    def _text(self, ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return call(
            lambda: self.tokenizer.decode(ids, skip_special_tokens=False),
            "the tokenizer failed to decode",
            ArtifactError,
        )


# dynamic builds a top_k ** n grid per back-off level: past this many cells a step would take
# hundreds of MB (top_k 50 at 4 heads is 6.25M).
MAX_GRID_CELLS = 1 << 23


def _check_grid(config: SamplingConfig, heads: int) -> None:
    if config.mode == "dynamic" and config.eps_b < 1 and config.top_k**heads > MAX_GRID_CELLS:
        fitting = int(MAX_GRID_CELLS ** (1 / heads)) + 1
        while fitting**heads > MAX_GRID_CELLS:  # the float root can land one off
            fitting -= 1
        raise InputError(
            f"dynamic mode over {heads} heads with top_k={config.top_k} builds a {config.top_k}^{heads}-cell "
            f"grid, over the {MAX_GRID_CELLS:,} cells a step may take: use top_k <= {fitting}, or mode='verify'"
        )


def _check_seed(seed) -> None:
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**128):
        raise InputError(f"seed={str(seed)[:40]!s} must be None or an integer in [0, 2**128)")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
