"""What a training run tells the person watching it: per-head losses, validation, an estimate, a summary, a plot.

A DynaMo loss is a sum over heads whose terms differ by several nats (head 3 predicts
t+3), so a single summed number says neither whether head 1 still matches the base nor
whether the new heads learn: every figure here is per head, named loss1, loss2, ...
(head i predicts token t+i). Training's own loop (dynamo_export/training.py) calls
`TrainReport` once per step; the report only formats and prints, so it cannot change a
run's trajectory.

- progress line: loss1..n (train CE of the step), kl2..n when distilling, tokens/s;
  tqdm adds the ETA;
- after ESTIMATE_AFTER steps, one line with the measured time per step and the time left
  (a T3 stage costs ~3x a base's time per token, which surprised people);
- at each evaluation, one line of validation CE per head and head 1's perplexity;
- at the end, a table per head (first and last validation loss, mean train loss of the
  last steps) and OUT/loss.png drawn from OUT/train_log.jsonl (matplotlib; skipped with a
  note where it is missing).
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from runtime.atomic import atomic_write_bytes

ESTIMATE_AFTER = 3  # steps timed before the estimate is printed (the first ones include warm-up)
TAIL_STEPS = 20  # train losses averaged for the summary's "last train" column
PLOT_NAME = "loss.png"


def head_fields(prefix: str, values: list[float], first: int = 1) -> dict[str, str]:
    """{"loss1": "3.142", ...}: one named field per head."""
    return {f"{prefix}{i}": f"{v:.3f}" for i, v in enumerate(values, start=first)}


def postfix(record: dict) -> dict[str, str]:
    """The progress line of one step's log record."""
    fields = head_fields("loss", record["train_loss"])
    fields.update(head_fields("kl", record.get("train_kl", []), first=2))
    fields["tok_s"] = f"{record['tokens_per_s']:.0f}"
    return fields


def validation_line(step: int, losses: list[float]) -> str:
    heads = " ".join(f"{name} {value}" for name, value in head_fields("loss", losses).items())
    return f"step {step} validation: {heads} (head 1 perplexity {math.exp(min(losses[0], 50)):.1f})"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class TrainReport:
    """Prints a run's figures as it goes; `finish` adds the summary table and the loss plot."""

    def __init__(self, bar: tqdm, start: int, end: int, eval_every: int):
        self.bar, self.start, self.end, self.eval_every = bar, start, end, eval_every
        self.began = time.perf_counter()
        self.estimated = False

    def step(self, record: dict) -> None:
        self.bar.set_postfix(postfix(record))
        if "val_loss" in record:
            tqdm.write(validation_line(record["step"], record["val_loss"]))
        done = record["step"] - self.start
        if (
            not self.estimated
            and done == min(ESTIMATE_AFTER, self.end - self.start)
            and record["step"] < self.end
        ):
            self.estimated = True
            per_step = (time.perf_counter() - self.began) / done
            left = per_step * (self.end - record["step"])
            tqdm.write(
                f"estimate: {per_step:.2f} s per step over the first {done} steps (validation included), "
                f"about {_duration(left)} for the {self.end - record['step']} steps left"
            )

    def finish(self, log_path: Path, out: Path) -> None:
        """Print the per-head summary of the whole run and draw OUT/loss.png from its log."""
        records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        print(summary_table(records, time.perf_counter() - self.began))
        print(plot_losses(records, out / PLOT_NAME))


def summary_table(records: list[dict], seconds: float) -> str:
    """Per head: validation loss at the first and last evaluation, mean train loss of the last steps."""
    vals = [r for r in records if "val_loss" in r]
    trains = [r["train_loss"] for r in records if "train_loss" in r][-TAIL_STEPS:]
    heads = len((vals or [{"val_loss": trains[-1] if trains else []}])[-1]["val_loss"])
    lines = [f"{'head':<6}{'val first':>11}{'val last':>10}{'ppl last':>10}{'train last':>12}"]
    for i in range(heads):
        first = f"{vals[0]['val_loss'][i]:.3f}" if vals else "-"
        last = f"{vals[-1]['val_loss'][i]:.3f}" if vals else "-"
        ppl = f"{math.exp(min(vals[-1]['val_loss'][i], 50)):.1f}" if vals else "-"
        train = f"{sum(t[i] for t in trains) / len(trains):.3f}" if trains else "-"
        lines.append(f"loss{i + 1:<2}{first:>11}{last:>10}{ppl:>10}{train:>12}")
    steps = records[-1]["step"] if records else 0
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    rate = f", {sum(rates) / len(rates):,.0f} tokens/s" if rates else ""
    lines.append(f"summary: {steps} steps, this run {_duration(seconds)}{rate} (train last: mean of the last "
                 f"{len(trains)} steps; val: {len(vals)} evaluations)")  # fmt: skip
    return "\n".join(lines)


def plot_losses(records: list[dict], path: Path) -> str:
    """Train (thin) and validation (markers) loss per head over steps, written atomically; returns a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f'no {path.name}: matplotlib is missing (pip install "dynamo-export[export]")'
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    heads = len((train or val)[0][1]) if train or val else 0
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i in range(heads):
        color = f"C{i}"
        if train:
            ax.plot([s for s, _ in train], [v[i] for _, v in train], color=color, lw=0.8, alpha=0.6,
                    label=f"loss{i + 1} train")  # fmt: skip
        if val:
            ax.plot([s for s, _ in val], [v[i] for _, v in val], color=color, marker="o", ms=4, lw=1.5,
                    label=f"loss{i + 1} val")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("loss_i: head i predicts token t+i")
    ax.grid(alpha=0.3)
    if heads:
        ax.legend(fontsize=8, ncol=2)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return f"wrote {path}"
