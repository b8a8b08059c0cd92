"""verify mode on the shipped reference model through the whole runtime: greedy verify is greedy
`ar` token for token, and sampled verify's tokens follow `ar`'s distribution (two-sample
chi-square over independent seeds), while a deliberately wrong acceptance rule fails the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from converters.cli import main as export_main
from dynamo_bench.prompts import PAPER_PROMPTS
from runtime import DynaMoRuntime, SamplingConfig
from runtime.draws import sample_ar
from runtime.tokensets import tokens_plus
from runtime.verify import Verified, Verifier, ar_distribution, draw_residual

MODEL = Path(__file__).resolve().parents[1] / "artifacts" / "reference-t3"
PROMPTS = (*PAPER_PROMPTS, "The os module provides", "To open a file for reading, use")  # + make run's
SAMPLES = 1200  # generations per mode, each from its own seed
ALPHA = 1e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> DynaMoRuntime:
    out = tmp_path_factory.mktemp("reference") / "t3-onnx"
    args = ["--model", str(MODEL), "--out", str(out), "--cooccurrence", str(MODEL / "cooccurrence")]
    assert export_main(args) == 0
    return DynaMoRuntime.load(out, threads=1)


@pytest.mark.slow
def test_greedy_verify_is_greedy_ar_on_every_prompt(reference):
    greedy = SamplingConfig(temperature=0.0)
    for prompt in PROMPTS:
        ar = reference.generate(prompt, 48, greedy.replace(mode="ar"), seed=0)
        verify = reference.generate(prompt, 48, greedy.replace(mode="verify"), seed=0)
        assert verify.token_ids == ar.token_ids, prompt
        assert verify.stats.accepted > 0 and verify.stats.tokens_per_pass > 1.2


def positions_2_and_3(rt: DynaMoRuntime, config: SamplingConfig, seeds: range) -> np.ndarray:
    """(len(seeds), 2): the 2nd and 3rd generated token of one prompt, one generation per seed."""
    return np.array([rt.generate("How can we", 3, config, seed=seed).token_ids[1:3] for seed in seeds])


def two_sample_p(first: np.ndarray, second: np.ndarray) -> float:
    """Chi-square test of homogeneity of two token samples; tokens expected < 5 times pooled."""
    tokens, inverse = np.unique(np.concatenate([first, second]), return_inverse=True)
    table = np.zeros((2, tokens.size))
    np.add.at(table, (np.repeat([0, 1], [first.size, second.size]), inverse), 1)
    rare = table.sum(axis=0) < 10
    pooled = np.column_stack([table[:, ~rare], table[:, rare].sum(axis=1)]) if rare.any() else table
    return stats.chi2_contingency(pooled[:, pooled.sum(axis=0) > 0]).pvalue


@pytest.fixture(scope="module")
def ar_sample(reference) -> np.ndarray:
    return positions_2_and_3(reference, SamplingConfig(mode="ar"), range(SAMPLES))


@pytest.mark.slow
def test_sampled_verify_follows_ars_distribution(reference, ar_sample):
    verify = positions_2_and_3(reference, SamplingConfig(mode="verify"), range(SAMPLES, 2 * SAMPLES))
    for position in (0, 1):
        p = two_sample_p(ar_sample[:, position], verify[:, position])
        print(f"token {position + 2}: two-sample chi-square p = {p:.3f}")
        assert p > ALPHA


def accept_with_p_not_p_over_q(self, head1_logits, draft, generated, masks, config, rng):
    """A careless acceptance rule: draft x passes with probability p(x) instead of min(1, p/q)."""
    for j, token in enumerate(draft.tokens):
        p = ar_distribution(head1_logits[j], tokens_plus(generated, draft.tokens[:j]), config)
        if rng.random() >= p.probs[p.ids == token].sum():
            return Verified((*draft.tokens[:j], draw_residual(p, draft.dists[j], rng)), j)
    m = len(draft.tokens)
    bonus = sample_ar(head1_logits[m], tokens_plus(generated, draft.tokens), config, rng)
    return Verified((*draft.tokens, bonus), m)


@pytest.mark.slow
def test_the_chi_square_test_catches_a_wrong_acceptance_rule(reference, ar_sample, monkeypatch):
    monkeypatch.setattr(Verifier, "check", accept_with_p_not_p_over_q)
    wrong = positions_2_and_3(reference, SamplingConfig(mode="verify"), range(SAMPLES, 2 * SAMPLES))
    p_values = [two_sample_p(ar_sample[:, i], wrong[:, i]) for i in (0, 1)]
    print(f"wrong rule: two-sample chi-square p = {p_values}")
    assert min(p_values) < ALPHA
