"""Expected speculative-sampling acceptance of each draft position, teacher-forced on a token file.

In `verify` mode (docs/METHOD.md, "Verify mode") head 1 emits x[t+1] at position t
and heads i = 2..n draft x[t+i]; the next pass accepts draft i with probability
min(1, p(x) / q_i(x)), p being head 1's distribution at position t+i-1 (the one
that predicts the same token). Averaged over the draft, the acceptance is

    alpha_i = E_{x ~ q_i} min(1, p(x) / q_i(x)) = sum_x min(p(x), q_i(x)),

and this module reports its mean over the positions of a token file, with the
true tokens as context (teacher forcing: head 1 at t+i-1 reads x[..t+i-1] from
the file, as it would after the earlier drafts were accepted).

p and q_i are the runtime's sampling distributions at its defaults: softmax at
temperature 0.7 over the top-k = 50 logits, renormalised (the repetition
penalty, which depends on the generated history, is off). Drafts:
- marginal: q_i = f_i, head i's own distribution;
- conditioned on the masks (`--cooccurrence`), with alpha_c = 1 and x[t+1],
  x[t+2] the true next tokens:
    q_2(b) ∝ f_2(b) W(x[t+1], b) over head 2's top-k, if W holds one of them;
    q_3(c) ∝ f_3(c) W(x[t+1], x[t+2], c) if the triple row holds one of head 3's
    top-k, else ∝ f_3(c) W(x[t+2], c) if that pair row does;
  and the marginal otherwise. Heads beyond 3 keep their marginal.

Tokens per pass. A verify pass emits the accepted drafts plus one token, and
draft i is only checked once drafts 2..i-1 passed, so with a_i(t) the
acceptance at position t the pass emits 1 + sum_i prod_{j<=i} a_j(t) tokens in
expectation. `tokens_per_pass` averages that over the positions: an estimate,
because teacher forcing conditions each a_j(t) on the true earlier tokens
rather than on the accepted drafts.

Positions. Windows of seq_len + n tokens start every seq_len tokens (as in
evaluation.py); in each, positions t < seq_len - n + 1 are scored, the ones
where head 1's position t+n-1 is still inside the window, so every draft
position averages over the same contexts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dynamo_export.errors import DynaMoError
from dynamo_export.evaluation import window_plan

RUNTIME_TEMPERATURE = 0.7  # runtime.config.SamplingConfig's defaults
RUNTIME_TOP_K = 50


class AcceptanceError(DynaMoError):
    """The acceptance measurement was asked for something it cannot measure (the message says what)."""


@dataclass
class AcceptanceResult:
    num_token_heads: int
    seq_len: int
    num_windows: int
    num_positions: int  # positions scored per draft position (the same for each)
    temperature: float
    top_k: int
    marginal: list[float]  # alpha_i for i = 2..n, q_i = head i's marginal
    tokens_per_pass: float  # 1 + mean_t sum_i prod_{j<=i} a_j(t), marginal drafts
    conditioned: list[float] | None = None  # the same with co-occurrence-conditioned drafts
    tokens_per_pass_cond: float | None = None
    # Share of positions whose draft used the masks: {"q2_pairs", "q3_triples", "q3_pairs"}.
    mask_use: dict[str, float] | None = None

    def metrics(self) -> dict[str, float]:
        """{"alpha_2": .., "alpha_3": .., "tokens_per_pass": .., "alpha_2_cond": .., ...}."""
        out = {f"alpha_{i + 2}": a for i, a in enumerate(self.marginal)}
        out["tokens_per_pass"] = self.tokens_per_pass
        if self.conditioned is not None:
            out.update({f"alpha_{i + 2}_cond": a for i, a in enumerate(self.conditioned)})
            out["tokens_per_pass_cond"] = self.tokens_per_pass_cond
        return out

    def to_json(self) -> dict:
        return {**asdict(self), "alpha": self.metrics()}


def sampling_distribution(
    logits: torch.Tensor, temperature: float, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The runtime's sampling distribution: (ids (..., k) int64, probs (..., k) float64 summing to 1).

    softmax(logits / T) restricted to the top-k logits and renormalised, which is
    softmax over the top-k logits alone.
    """
    values, ids = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
    return ids, torch.softmax(values.double() / temperature, dim=-1)


def overlap(p_ids: torch.Tensor, p: torch.Tensor, q_ids: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_x min(p(x), q(x)) for sparse distributions given as (ids, probs) over the last axis: (...,).

    Ids are unique within each distribution (top-k); a token absent from either side adds 0.
    """
    same = p_ids[..., :, None] == q_ids[..., None, :]  # (..., kp, kq)
    mins = torch.minimum(p[..., :, None], q[..., None, :])
    return torch.where(same, mins, torch.zeros((), dtype=mins.dtype)).sum(dim=(-2, -1))


def reweighted(f: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with some weight > 0 become f * W renormalised; other rows stay f. -> (probs, used (...,) bool)."""
    product = f * weights
    mass = product.sum(-1, keepdim=True)
    used = mass[..., 0] > 0
    return torch.where(used[..., None], product / torch.where(mass > 0, mass, 1.0), f), used


class MaskLookup:
    """Vectorised W lookups from a runtime.cooccurrence.CooccurrenceMask (read-only, through csr_tables()).

    Pair entry (a, b) has key a*V + b in the CSR's row-major order; triple entry
    (r, c) of pair entry r has key r*V + c; both key arrays ascend strictly, so one
    np.searchsorted finds any batch of n-grams. Ids >= V (rows a model pads its
    embedding with) were never counted: W = 0.
    """

    def __init__(self, mask):
        tables = mask.csr_tables()
        self.vocab_size = V = mask.vocab_size
        self.orders = tuple(mask.orders)
        self._pair_keys = _row_major_keys(tables.pair_indptr, tables.pair_indices, V)
        self._pair_values = np.append(tables.pair_values.astype(np.float64), 0.0)  # [-1] answers "unseen"
        if 3 in self.orders:
            self._triple_keys = _row_major_keys(tables.triple_indptr, tables.triple_indices, V)
            self._triple_values = np.append(tables.triple_values.astype(np.float64), 0.0)

    def pairs(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """W(a[...], b[..., j]): a (P,), b (P, k) -> (P, k) float64."""
        return self._pair_values[self._pair_entries(a[:, None], b)]

    def triples(self, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        """W(a[...], b[...], c[..., j]): a, b (P,), c (P, k) -> (P, k) float64."""
        if 3 not in self.orders:
            raise AcceptanceError("the co-occurrence directory holds no triples: count it with --orders 2,3")
        pair = self._pair_entries(a, b)[:, None]  # (P, 1)
        valid = (pair >= 0) & (c < self.vocab_size)
        keys = np.where(valid, pair * self.vocab_size + c, -1)
        return self._triple_values[_find(self._triple_keys, keys)]

    def _pair_entries(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        valid = (a < self.vocab_size) & (b < self.vocab_size)
        return _find(self._pair_keys, np.where(valid, a * self.vocab_size + b, -1))


def _row_major_keys(indptr: np.ndarray, indices: np.ndarray, ncols: int) -> np.ndarray:
    rows = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
    return rows * ncols + indices.astype(np.int64)


def _find(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Entry id of each key in sorted_keys, -1 where absent (or where key is -1)."""
    if sorted_keys.size == 0:
        return np.full(keys.shape, -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return np.where((keys >= 0) & (sorted_keys[at] == keys), at, -1)


@torch.no_grad()
def expected_acceptance(
    model,
    ids: np.ndarray,
    seq_len: int,
    batch_size: int,
    masks=None,
    temperature: float = RUNTIME_TEMPERATURE,
    top_k: int = RUNTIME_TOP_K,
    max_batches: int | None = None,
    progress: bool = True,
) -> AcceptanceResult:
    """alpha_i for draft positions i = 2..n over `ids` (see the module docstring).

    `masks`: a runtime.cooccurrence.CooccurrenceMask for the conditioned drafts, or None.
    """
    n = model.num_token_heads
    if n < 2:
        raise AcceptanceError("acceptance is measured for draft heads 2..n, but this model has one head")
    if not (temperature > 0 and math.isfinite(temperature)) or top_k < 1:
        raise AcceptanceError(f"need temperature > 0 and top_k >= 1, got {temperature} and {top_k}")
    if seq_len < n or batch_size < 1:
        raise AcceptanceError(f"need seq_len >= n = {n} and batch_size >= 1, got {seq_len} and {batch_size}")
    lookup = MaskLookup(masks) if masks is not None else None
    if lookup is not None and lookup.vocab_size > model.config.vocab_size:
        raise AcceptanceError(
            f"the masks were counted over {lookup.vocab_size} tokens, the model has {model.config.vocab_size}: "
            "count them on a token file of the model's own tokenizer"
        )
    windows, batches = window_plan(len(ids), seq_len, n, batch_size, max_batches)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = _Sums(n, lookup is not None)
    try:
        for b in tqdm(range(batches), desc="acceptance", unit="batch", disable=not progress, leave=False):
            starts = range(b * batch_size * seq_len, min((b + 1) * batch_size, windows) * seq_len, seq_len)
            window = torch.from_numpy(
                np.stack([np.asarray(ids[s : s + seq_len + n], dtype=np.int64) for s in starts])
            )  # (B, seq_len + n)
            logits = model(window[:, :seq_len].to(device)).logits.float().cpu()  # (B, n, seq_len, V)
            _score_batch(logits, window, temperature, top_k, lookup, sums)
    finally:
        model.train(was_training)
    return sums.result(seq_len, windows, temperature, top_k)


class _Sums:
    def __init__(self, n: int, conditioned: bool):
        self.n, self.positions = n, 0
        self.marginal = torch.zeros(n - 1, dtype=torch.float64)
        self.conditioned = torch.zeros(n - 1, dtype=torch.float64) if conditioned else None
        self.chain = torch.zeros((), dtype=torch.float64)  # sum_t sum_i prod_{j<=i} a_j(t)
        self.chain_cond = torch.zeros((), dtype=torch.float64)
        self.mask_use = dict.fromkeys(("q2_pairs", "q3_triples", "q3_pairs"), 0) if conditioned else None

    def result(self, seq_len: int, windows: int, temperature: float, top_k: int) -> AcceptanceResult:
        count = self.positions
        return AcceptanceResult(
            num_token_heads=self.n,
            seq_len=seq_len,
            num_windows=windows,
            num_positions=count,
            temperature=temperature,
            top_k=top_k,
            marginal=(self.marginal / count).tolist(),
            tokens_per_pass=1.0 + float(self.chain) / count,
            conditioned=None if self.conditioned is None else (self.conditioned / count).tolist(),
            tokens_per_pass_cond=None if self.conditioned is None else 1.0 + float(self.chain_cond) / count,
            mask_use=None if self.mask_use is None else {k: v / count for k, v in self.mask_use.items()},
        )


def _score_batch(logits, window, temperature, top_k, lookup: MaskLookup | None, sums: _Sums) -> None:
    """Add one batch's per-position acceptances to `sums`."""
    batch, n, seq_len, _ = logits.shape
    count = seq_len - n + 1  # positions t whose every teacher position t+i-1 is in the window
    p_ids, p = sampling_distribution(logits[:, 0], temperature, top_k)  # (B, seq_len, k)
    x1 = window[:, 1 : 1 + count].reshape(-1).numpy()  # true x[t+1], x[t+2]: (B * count,)
    x2 = window[:, 2 : 2 + count].reshape(-1).numpy()
    passed = torch.ones(batch, count, dtype=torch.float64)  # prod_{j<=i} a_j(t), marginal drafts
    passed_cond = passed.clone()
    for j in range(1, n):  # draft position i = j + 1
        q_ids, q = sampling_distribution(logits[:, j, :count], temperature, top_k)  # (B, count, k)
        teacher_ids, teacher = p_ids[:, j : j + count], p[:, j : j + count]
        accepted = overlap(teacher_ids, teacher, q_ids, q)  # (B, count)
        sums.marginal[j - 1] += accepted.sum()
        passed *= accepted
        sums.chain += passed.sum()
        if lookup is None:
            continue
        flat_ids = q_ids.reshape(-1, q_ids.shape[-1]).numpy()  # (B * count, k)
        flat_q = q.reshape(-1, q.shape[-1])
        if j == 1:
            flat_q, used = reweighted(flat_q, torch.from_numpy(lookup.pairs(x1, flat_ids)))
            sums.mask_use["q2_pairs"] += int(used.sum())
        elif j == 2:
            flat_q, used = _conditioned_third(flat_q, flat_ids, x1, x2, lookup)
            sums.mask_use["q3_triples"] += int(used[0].sum())
            sums.mask_use["q3_pairs"] += int(used[1].sum())
        accepted = overlap(teacher_ids, teacher, q_ids, flat_q.view_as(q))
        sums.conditioned[j - 1] += accepted.sum()
        passed_cond *= accepted
        sums.chain_cond += passed_cond.sum()
    sums.positions += batch * count


def _conditioned_third(f, ids, x1, x2, lookup: MaskLookup):
    """q_3: triples (x1, x2, c) where the row holds a candidate, else pairs (x2, c), else the marginal."""
    by_pair, pair_used = reweighted(f, torch.from_numpy(lookup.pairs(x2, ids)))
    if 3 not in lookup.orders:  # pair masks only
        return by_pair, (torch.zeros_like(pair_used), pair_used)
    by_triple, triple_used = reweighted(f, torch.from_numpy(lookup.triples(x1, x2, ids)))
    pair_used &= ~triple_used
    return torch.where(triple_used[:, None], by_triple, by_pair), (triple_used, pair_used)


def format_acceptance(result: AcceptanceResult) -> str:
    rows = [("draft position", "marginal", "conditioned")]
    for i, a in enumerate(result.marginal):
        cond = "-" if result.conditioned is None else f"{result.conditioned[i]:.4f}"
        rows.append((f"alpha_{i + 2}", f"{a:.4f}", cond))
    cond = "-" if result.tokens_per_pass_cond is None else f"{result.tokens_per_pass_cond:.4f}"
    rows.append(("tokens/pass", f"{result.tokens_per_pass:.4f}", cond))
    header = f"expected acceptance (T {result.temperature}, top-k {result.top_k}, {result.num_positions} positions)"
    return "\n".join([header] + [f"{a:<15} {b:>10} {c:>12}" for a, b, c in rows])
