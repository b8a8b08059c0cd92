"""Training you can watch (issue 20, item 3): per-head losses named loss1..n in the progress line, per-head
validation at each evaluation, an early time estimate, an end-of-run summary table and OUT/loss.png."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dynamo_export.cli.train import main as train_main
from dynamo_export.tokens import write_token_file
from dynamo_export.train_report import plot_losses, postfix, summary_table, validation_line

VOCAB = 40


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-tokens")
    ids = (np.arange(3000) * 7) % VOCAB
    write_token_file(root / "train", ids, VOCAB, eot_id=0)
    write_token_file(root / "val", ids[:600], VOCAB, eot_id=0)
    return root


def test_a_run_prints_per_head_losses_an_estimate_a_summary_and_plots_them(tokens, tmp_path, capsys):
    out = tmp_path / "run"
    train_main(["--train", str(tokens / "train"), "--val", str(tokens / "val"), "--out", str(out),
                "--layers", "2", "--hidden", "16", "--heads", "2", "--num-token-heads", "3", "--seq-len", "8",
                "--batch-size", "2", "--steps", "8", "--eval-every", "4", "--eval-batches", "2",
                "--lr-b", "1e-3", "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    for step in (0, 4, 8):
        assert f"step {step} validation: loss1 " in printed and "loss2 " in printed and "loss3 " in printed
    assert "estimate:" in printed and "steps left" in printed
    table = printed[printed.index("\nhead ") + 1 :].splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["loss1", "loss2", "loss3"]
    assert "summary: 8 steps" in printed
    png = out / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in printed
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    last_val = next(r["val_loss"] for r in reversed(records) if "val_loss" in r)
    assert f"{last_val[2]:.3f}" in table[3]  # the table shows the log's numbers, per head


def test_the_progress_line_names_every_head():
    fields = postfix({"train_loss": [2.0, 3.5, 4.25], "train_kl": [0.5, 0.75], "tokens_per_s": 1234.4})
    assert fields == {"loss1": "2.000", "loss2": "3.500", "loss3": "4.250", "kl2": "0.500", "kl3": "0.750",
                      "tok_s": "1234"}  # fmt: skip
    assert (
        validation_line(7, [1.0, 2.0]) == "step 7 validation: loss1 1.000 loss2 2.000 (head 1 perplexity 2.7)"
    )


def test_summary_and_plot_of_a_log_without_evaluations(tmp_path):
    records = [{"step": s, "train_loss": [3.0 - s / 10, 4.0], "tokens_per_s": 100.0} for s in range(1, 4)]
    text = summary_table(records, 5.0)
    assert "loss1" in text and "loss2" in text and "2.800" in text and "summary: 3 steps" in text
    assert plot_losses(records, tmp_path / "loss.png").startswith("wrote")
