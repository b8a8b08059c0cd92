"""MAUVE and self-BLEU (dynamo_bench/judges.py): what each must say about text sets whose answer is known."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dynamo_bench import judges

SENTENCES = [
    "The parser reads every argument from the command line.",
    "Each option declares the type its value converts to.",
    "Errors name the offending value and the expected form.",
    "A subcommand gets its own parser and its own help text.",
    "Lists collect repeated options in the order they were given.",
    "The namespace holds one attribute for every destination.",
]


def test_self_bleu_is_one_for_copies_and_zero_for_disjoint_texts():
    assert judges.self_bleu([SENTENCES[0]] * 4) == pytest.approx(1.0)
    disjoint = ["alpha beta gamma delta", "epsilon zeta eta theta", "iota kappa lambda mu"]
    assert judges.self_bleu(disjoint) == pytest.approx(0.0)
    assert judges.self_bleu(SENTENCES[:1]) is None  # nothing to compare with


def test_self_bleu_rises_as_generations_repeat_each_other_and_ignores_their_order():
    varied = judges.self_bleu(SENTENCES)
    repetitive = judges.self_bleu([*SENTENCES[:4], SENTENCES[0], SENTENCES[1]])
    assert 0 < varied < repetitive < 1
    assert judges.self_bleu(SENTENCES[::-1]) == pytest.approx(varied)


def test_mauve_tells_one_distribution_from_another():
    rng = np.random.default_rng(0)
    human = rng.normal(size=(60, 16))
    same = rng.normal(size=(60, 16))
    apart = rng.normal(size=(60, 16)) + 4.0
    close = judges.mauve_score(human, same)
    far = judges.mauve_score(human, apart)
    assert close > 0.8 and far < 0.2
    assert judges.mauve_score(human, same) == close  # seeded: a rerun gives the same figure
    assert judges.mauve_score(human[:1], same) is None


def test_text_judges_score_mauve_only_where_there_are_human_continuations():
    words = {i: w for i, w in enumerate(" ".join(SENTENCES).split())}

    def decode(ids):
        return " ".join(words[i] for i in ids)

    human = {"in-domain": [(0, 1, 2, 3), (9, 10, 11, 12), (18, 19, 20, 21)]}
    text_judges = judges.TextJudges(decode, human)
    generations = {0: [(0, 1, 2, 3), (9, 10, 11, 12), (18, 19, 20, 21)], 1: [(0, 1, 2, 3)] * 3}
    scored = text_judges.score("in-domain", generations)
    assert set(scored) == {"mauve", "mauve_per_seed", "self_bleu", "self_bleu_per_seed"}
    assert scored["self_bleu_per_seed"]["1"] == pytest.approx(1.0)  # three copies
    assert scored["self_bleu_per_seed"]["0"] < 1
    assert scored["mauve"] == pytest.approx(np.mean(list(scored["mauve_per_seed"].values())))
    assert set(text_judges.score("paper", generations)) == {"self_bleu", "self_bleu_per_seed"}
    assert set(judges.TextJudges(decode, human, mauve=False).score("in-domain", generations)) == {
        "self_bleu",
        "self_bleu_per_seed",
    }


def test_only_faiss_sample_size_warnings_are_dropped_from_stderr(capfd):
    with judges._faiss_sample_size_warnings_dropped():
        os.write(
            2, b"WARNING clustering 40 points to 2 centroids: please provide at least 78 training points\n"
        )
        os.write(2, b"a real problem\n")
    assert capfd.readouterr().err == "a real problem\n"
