"""Expected verify-mode acceptance: hand-made distributions, mask lookups, and a brute force on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dynamo_export import DynaMoForCausalLM
from dynamo_export.acceptance import (
    AcceptanceError,
    MaskLookup,
    expected_acceptance,
    overlap,
    reweighted,
    sampling_distribution,
)
from dynamo_export.cli.eval import main as eval_main
from dynamo_export.cooccurrence import build_cooccurrence
from dynamo_export.tokens import open_tokens, write_token_file
from runtime.cooccurrence import CooccurrenceMask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 40
SEQ, BATCH, BATCHES, TOP_K, TEMPERATURE = 8, 4, 3, 6, 0.7


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A Markov chain where each token has 5 successors: sparse pairs and triples, so every draft rule
    (triples, pairs, marginal) is taken somewhere. Returns (tokens path, masks directory)."""
    root = tmp_path_factory.mktemp("acceptance")
    rng = np.random.default_rng(0)
    successors = rng.integers(0, VOCAB, (VOCAB, 5))
    ids = [1]
    for _ in range(1999):
        ids.append(int(successors[ids[-1], rng.integers(5)]))
    write_token_file(root / "tokens", np.array(ids), VOCAB, eot_id=0)
    build_cooccurrence(root / "tokens", root / "cooc", orders=(2, 3), workers=1, progress=False)
    return root / "tokens.bin", root / "cooc"


def tiny_t3(seed: int = 0) -> DynaMoForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.3,
    )  # fmt: skip
    return DynaMoForCausalLM.from_gpt_neox(GPTNeoXForCausalLM(config), num_token_heads=3).eval()


# -- the pieces ---------------------------------------------------------------------------------------


def _dist(pairs):
    ids, probs = zip(*pairs, strict=True)
    return torch.tensor(ids), torch.tensor(probs, dtype=torch.float64)


def test_overlap_of_hand_made_distributions():
    p = _dist([(3, 0.5), (7, 0.3), (1, 0.2)])
    assert overlap(*p, *_dist([(1, 0.2), (3, 0.5), (7, 0.3)])).item() == pytest.approx(
        1.0
    )  # q = p, any order
    assert overlap(*p, *_dist([(0, 0.6), (2, 0.4)])).item() == 0.0  # disjoint supports
    # shared tokens 3 and 1: min(0.5, 0.1) + min(0.2, 0.6) = 0.3
    assert overlap(*p, *_dist([(3, 0.1), (1, 0.6), (9, 0.3)])).item() == pytest.approx(0.3)
    batch = overlap(torch.stack([p[0], p[0]]), torch.stack([p[1], p[1]]), torch.stack([p[0], p[0] + 10]),
                    torch.stack([p[1], p[1]]))  # fmt: skip
    assert batch.tolist() == pytest.approx([1.0, 0.0])


def test_sampling_distribution_is_the_renormalised_top_k_at_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0, 0.5]])
    ids, probs = sampling_distribution(logits, 0.5, 3)
    assert ids.tolist() == [[1, 2, 0]]
    expected = np.exp(np.array([3.0, 2.0, 1.0]) / 0.5)
    assert probs[0].tolist() == pytest.approx((expected / expected.sum()).tolist())
    assert sampling_distribution(logits, 1.0, 50)[0].shape == (1, 5)  # k beyond the vocabulary: all of it


def test_reweighting_uses_the_masks_only_where_they_hold_a_candidate():
    f = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]], dtype=torch.float64)
    w = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    q, used = reweighted(f, w)
    assert used.tolist() == [True, False]
    assert q[0].tolist() == pytest.approx([1.0 / 1.2, 0.0, 0.2 / 1.2])
    assert torch.equal(q[1], f[1])


def test_vectorised_lookups_equal_the_runtime_mask(corpus):
    mask = CooccurrenceMask.load(corpus[1])
    lookup = MaskLookup(mask)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, VOCAB, 30), rng.integers(0, VOCAB, 30)
    c = rng.integers(0, VOCAB + 3, (30, 7))  # ids past the masks' vocabulary read as unseen
    pairs, triples = lookup.pairs(a, c), lookup.triples(a, b, c)
    assert (pairs > 0).any() and (pairs == 0).any() and (triples > 0).any() and (triples == 0).any()
    for r in range(30):
        inside = c[r] < VOCAB
        want_pairs = np.zeros(7)
        want_pairs[inside] = mask.weights([a[r : r + 1], c[r][inside]])[0]
        want_triples = np.zeros(7)
        want_triples[inside] = mask.weights([a[r : r + 1], b[r : r + 1], c[r][inside]])[0, 0]
        assert pairs[r].tolist() == want_pairs.tolist() and triples[r].tolist() == want_triples.tolist()


# -- the whole measurement against a brute force ------------------------------------------------------


def _dense(logits_row: torch.Tensor) -> np.ndarray:
    """The runtime's distribution as a dense vector, written plainly: top-k set, then softmax over it."""
    order = sorted(range(VOCAB), key=lambda x: -logits_row[x].item())[:TOP_K]
    dense = np.zeros(VOCAB)
    for x in order:
        dense[x] = np.exp(logits_row[x].item() / TEMPERATURE)
    return dense / dense.sum()


def _conditioned(f: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    g = f * weights
    return g / g.sum() if g.sum() > 0 else None


def brute_force(model, ids, mask):
    """Per position: one forward pass per prefix, dense distributions, a loop over the vocabulary."""
    n = model.num_token_heads
    marginal, conditioned, count = np.zeros(n - 1), np.zeros(n - 1), 0
    chain, chain_cond = 0.0, 0.0  # sum over positions of sum_i prod_{j<=i} a_j
    with torch.no_grad():
        for k in range(BATCH * BATCHES):
            window = [int(x) for x in ids[k * SEQ : k * SEQ + SEQ + n]]

            def head(i, upto, window=window):  # head i's logits after reading window[: upto + 1]
                return model(torch.tensor([window[: upto + 1]])).logits[0, i - 1, -1]

            for t in range(SEQ - n + 1):
                x1, x2 = window[t + 1], window[t + 2]
                passed, passed_cond = 1.0, 1.0
                for i in range(2, n + 1):
                    p, f = _dense(head(1, t + i - 1)), _dense(head(i, t))
                    candidates = np.flatnonzero(f)
                    w = np.zeros(VOCAB)
                    if i == 2:
                        w[candidates] = mask.weights([[x1], candidates])[0]
                        q = _conditioned(f, w)
                    else:
                        w[candidates] = mask.weights([[x1], [x2], candidates])[0, 0]
                        q = _conditioned(f, w)
                        if q is None:
                            w[candidates] = mask.weights([[x2], candidates])[0]
                            q = _conditioned(f, w)
                    q = f if q is None else q
                    a, a_cond = (sum(min(p[x], d[x]) for x in range(VOCAB)) for d in (f, q))
                    marginal[i - 2] += a
                    conditioned[i - 2] += a_cond
                    passed, passed_cond = passed * a, passed_cond * a_cond
                    chain, chain_cond = chain + passed, chain_cond + passed_cond
                count += 1
    return marginal / count, conditioned / count, 1 + chain / count, 1 + chain_cond / count, count


def test_acceptance_matches_a_brute_force_over_the_vocabulary(corpus):
    tokens, cooc = corpus
    ids, _ = open_tokens(tokens)
    model, mask = tiny_t3(), CooccurrenceMask.load(cooc)
    result = expected_acceptance(model, ids, SEQ, BATCH, mask, TEMPERATURE, TOP_K, BATCHES, progress=False)
    marginal, conditioned, per_pass, per_pass_cond, count = brute_force(model, ids, mask)
    assert result.num_positions == count == BATCH * BATCHES * (SEQ - 2)
    assert result.marginal == pytest.approx(marginal.tolist(), abs=1e-6)
    assert result.conditioned == pytest.approx(conditioned.tolist(), abs=1e-6)
    assert result.tokens_per_pass == pytest.approx(per_pass, abs=1e-6)
    assert result.tokens_per_pass_cond == pytest.approx(per_pass_cond, abs=1e-6)
    # Acceptance is correlated along a pass: the chain is not the product of the means.
    assert per_pass != pytest.approx(1 + marginal[0] + marginal[0] * marginal[1], abs=1e-4)
    assert all(0 < share < 1 for share in result.mask_use.values())  # every rule was taken somewhere
    assert result.conditioned != pytest.approx(result.marginal, abs=1e-3)
    assert min(result.marginal) > 0 and max(result.marginal) < 1

    plain = expected_acceptance(model, ids, SEQ, BATCH, None, TEMPERATURE, TOP_K, BATCHES, progress=False)
    assert plain.marginal == result.marginal and plain.conditioned is None


class Oracle(torch.nn.Module):
    """A fake 3-head model whose head i at t returns head 1's logits at t + i - 1 + shift (clamped)."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift, self.num_token_heads = shift, 3
        self.config = GPTNeoXConfig(vocab_size=VOCAB)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids):
        head1 = self.table[input_ids]  # (B, T, V)
        seq = input_ids.shape[1]
        heads = [head1] + [head1[:, (torch.arange(seq) + i + self.shift).clamp(max=seq - 1)] for i in (1, 2)]
        return type("Out", (), {"logits": torch.stack(heads, dim=1)})  # (B, 3, T, V)


def test_positions_pair_each_draft_with_the_head_1_position_that_predicts_its_token(corpus):
    ids, _ = open_tokens(corpus[0])
    aligned = expected_acceptance(
        Oracle(0), ids, SEQ, BATCH, None, TEMPERATURE, TOP_K, BATCHES, progress=False
    )
    assert aligned.marginal == pytest.approx([1.0, 1.0], abs=1e-12)
    assert aligned.tokens_per_pass == pytest.approx(3.0, abs=1e-12)
    shifted = expected_acceptance(
        Oracle(1), ids, SEQ, BATCH, None, TEMPERATURE, TOP_K, BATCHES, progress=False
    )
    assert max(shifted.marginal) < 0.9


# -- errors and the CLI ---------------------------------------------------------------------------------


def test_single_head_models_and_bad_settings_are_refused(corpus):
    ids, _ = open_tokens(corpus[0])
    torch.manual_seed(0)
    base = DynaMoForCausalLM.from_gpt_neox(
        GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64)), num_token_heads=1)  # fmt: skip
    with pytest.raises(AcceptanceError, match=r"draft heads 2\.\.n, but this model has one head"):
        expected_acceptance(base, ids, SEQ, BATCH, progress=False)
    with pytest.raises(AcceptanceError, match="temperature > 0"):
        expected_acceptance(tiny_t3(), ids, SEQ, BATCH, temperature=0.0, progress=False)


def test_cli_reports_acceptance_in_json(corpus, tmp_path, capsys):
    tokens, cooc = corpus
    tiny_t3().save_pretrained(tmp_path / "t3")
    common = ["--model", str(tmp_path / "t3"), "--tokens", str(tokens), "--seq-len", str(SEQ),
              "--batch-size", str(BATCH), "--max-batches", str(BATCHES), "--no-progress"]  # fmt: skip
    eval_main([*common, "--acceptance", "--cooccurrence", str(cooc), "--top-k", str(TOP_K),
               "--json", str(tmp_path / "eval.json")])  # fmt: skip
    report = json.loads((tmp_path / "eval.json").read_text())
    ids, _ = open_tokens(tokens)
    direct = expected_acceptance(
        tiny_t3(), ids, SEQ, BATCH, CooccurrenceMask.load(cooc), TEMPERATURE, TOP_K, BATCHES, progress=False
    )
    assert report["acceptance"]["alpha"] == pytest.approx(direct.metrics())
    assert set(report["acceptance"]["alpha"]) == {
        "alpha_2", "alpha_3", "tokens_per_pass", "alpha_2_cond", "alpha_3_cond", "tokens_per_pass_cond"
    }  # fmt: skip
    assert "PPL_1" in report["ppl"] and "alpha_3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        eval_main([*common, "--cooccurrence", str(cooc)])
    assert "add --acceptance" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"dynamo-eval: error: .*nowhere"):
        eval_main([*common, "--acceptance", "--cooccurrence", str(tmp_path / "nowhere")])
