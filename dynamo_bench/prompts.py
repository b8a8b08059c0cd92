"""Prompt sets: the paper's ten sentence-completion prompts and in-domain prompts cut from held-out text.

In-domain prompts are deterministic: the held-out files are read in sorted path
order, split into paragraphs at blank lines, and only prose paragraphs are kept
(they start with a letter and hold at least MIN_WORDS words, so reST directives,
tables and code blocks drop out), and of those only the ones long enough for a
prompt plus a human continuation as long as the generations (`--max-new-tokens`):
MAUVE compares the two sets of texts, and a length gap alone would separate them.
N of them are taken evenly spaced over that list. A prompt is the paragraph's
first `prompt_tokens` tokens (as token ids, so no re-tokenisation drifts); the
next `reference_tokens` are kept as the paragraph's true continuation: MAUVE's
human text, and the reference point for judged perplexity ("how likely does
the judge find real held-out text").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from dynamo_bench.errors import BenchError

# docs/METHOD.md, "Evaluation": the paper's sentence-completion set.
PAPER_PROMPTS = (
    "I am a student at the",
    "This is going to be a very",
    "He wanted to play, but",
    "How can we",
    "What will",
    "Will you",
    "Please explain",
    "Do not",
    "Wow! I can't believe that",
    "This is amazing! We",
)
MIN_WORDS = 30


@dataclass(frozen=True)
class Prompt:
    set_name: str  # "paper" | "in-domain" | "file"
    text: str
    ids: tuple[int, ...]
    reference: tuple[int, ...] = field(default=())  # the true continuation (in-domain only)


def encode_prompts(texts, tokenizer: Tokenizer, set_name: str) -> list[Prompt]:
    prompts = [Prompt(set_name, text, tuple(tokenizer.encode(text).ids)) for text in texts]
    empty = [p.text for p in prompts if not p.ids]
    if empty:
        raise BenchError(f"prompts {empty!r} encode to no tokens: remove them from the prompt set")
    return prompts


def paper_prompts(tokenizer: Tokenizer) -> list[Prompt]:
    return encode_prompts(PAPER_PROMPTS, tokenizer, "paper")


def file_prompts(path: str | os.PathLike, tokenizer: Tokenizer) -> list[Prompt]:
    """One prompt per non-empty line of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"--prompts {path} is not a file: give a text file with one prompt per line")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise BenchError(f"--prompts {path} holds no prompts (every line is empty)")
    return encode_prompts(texts, tokenizer, "file")


def prose_paragraphs(root: str | os.PathLike) -> list[str]:
    """Prose paragraphs of every *.txt file under root, in sorted path order."""
    root = Path(root)
    files = sorted(root.rglob("*.txt"))
    if not files:
        raise BenchError(f"{root} holds no .txt files: pass the held-out corpus directory (--in-domain)")
    paragraphs = []
    for path in files:
        for block in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            text = block.strip()
            if text[:1].isalpha() and len(text.split()) >= MIN_WORDS:
                paragraphs.append(text)
    return paragraphs


def in_domain_prompts(
    root: str | os.PathLike,
    tokenizer: Tokenizer,
    count: int,
    prompt_tokens: int = 8,
    reference_tokens: int = 64,
) -> list[Prompt]:
    if count < 1 or prompt_tokens < 1:
        raise BenchError(
            f"in-domain prompts need count >= 1 and prompt_tokens >= 1, got {count}, {prompt_tokens}"
        )
    needed = prompt_tokens + reference_tokens
    paragraphs = prose_paragraphs(root)
    encoded = [e.ids for e in tokenizer.encode_batch(paragraphs)]
    long_enough = [ids for ids in encoded if len(ids) >= needed]
    if len(long_enough) < count:
        raise BenchError(
            f"{root} has {len(long_enough)} prose paragraphs of at least {needed} tokens ({prompt_tokens} of "
            f"prompt + {reference_tokens} of human continuation, as long as --max-new-tokens) and {count} were "
            "asked for: lower --num-in-domain or --max-new-tokens, or give a larger held-out corpus"
        )
    picks = [round(i * (len(long_enough) - 1) / max(count - 1, 1)) for i in range(count)]
    prompts = []
    for index in picks:
        ids = long_enough[index]
        head, tail = ids[:prompt_tokens], ids[prompt_tokens:needed]
        prompts.append(Prompt("in-domain", tokenizer.decode(head), tuple(head), tuple(tail)))
    return prompts
