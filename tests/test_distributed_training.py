"""torchrun data parallelism and --fsdp: N gloo processes on the CPU train the model one process trains.

Every multi-process run is the real entry point, `torchrun -m dynamo_export.cli.train`, in a
subprocess; the one-process runs call `train` in this process (with --fsdp: over a one-rank group).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dynamo_export.distributed import ProcessGroup
from dynamo_export.errors import TrainingError
from dynamo_export.training import TrainConfig, WindowSampler, train
from tests.conftest import noisy_cycle_token_files
from tests.test_training import TINY, VOCAB
from tests.test_training import tiny_config as training_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5  # N processes sum the gradient in another order than one


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    return noisy_cycle_token_files(tmp_path_factory.mktemp("tokens"), VOCAB, stride=7, noise=0.1, seed=0)


def tiny_config(token_files, out, **overrides) -> TrainConfig:
    """T3, LR_MB > 0 (both sources reach the shared weights), accumulation and clipping that bites."""
    fields = dict(grad_accum=2, steps=4, lr_mb=1e-3, warmup_frac=0.25, clip=0.5, eval_every=2)
    return training_config(token_files, out, **{**fields, **overrides})


def torchrun(cfg: TrainConfig, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc -m dynamo_export.cli.train` on cfg's settings."""
    flags = {
        "train": cfg.train, "val": cfg.val, "out": cfg.out, "num-token-heads": cfg.num_token_heads,
        "seq-len": cfg.seq_len, "batch-size": cfg.batch_size, "grad-accum": cfg.grad_accum,
        "steps": cfg.steps, "lr-b": cfg.lr_b, "lr-m": cfg.lr_m, "lr-mb": cfg.lr_mb,
        "warmup-frac": cfg.warmup_frac, "clip": cfg.clip, "eval-every": cfg.eval_every,
        "eval-batches": cfg.eval_batches, "save-every": cfg.save_every, "seed": cfg.seed, "distill": cfg.distill,
        "layers": TINY["num_hidden_layers"], "hidden": TINY["hidden_size"],
        "heads": TINY["num_attention_heads"], "intermediate": TINY["intermediate_size"],
        "context": TINY["max_position_embeddings"],
    }  # fmt: skip
    assert cfg.init_config == TINY
    args = [a for name, value in flags.items() for a in (f"--{name}", str(value))]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "dynamo_export.cli.train", *args, "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def assert_same_model(got, expected):
    got, expected = weights(got), weights(expected)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=0, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}"
        )


def log_records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(token_files, tmp_path_factory):
    """The reference: the whole run in one process (this one)."""
    cfg = tiny_config(token_files, tmp_path_factory.mktemp("one"))
    return cfg, train(cfg, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--fsdp",)], ids=["replicated", "fsdp"])
def test_two_processes_train_the_one_process_model(token_files, tmp_path, one_process, flags):
    cfg, reference = one_process
    out = tmp_path / "two"
    run = torchrun(replace(cfg, out=str(out), save_every=2), 2, *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_model(out / "final", reference)

    # Only rank 0 wrote: one log line per step, one checkpoint, one "wrote" line.
    records, expected = log_records(out), log_records(reference.parent)
    assert [r["step"] for r in records] == list(range(cfg.steps + 1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert run.stdout.count(f"wrote {out / 'final'}\n") == 1 and run.stdout.count("step 2 validation") == 1
    for got, want in zip(records, expected, strict=True):  # the global batch's figures, not rank 0's slice
        for key in ("train_loss", "val_loss"):
            assert got.get(key) == pytest.approx(want.get(key), abs=ATOL), (got["step"], key)
        if "grad_norm" in want:
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert any(r["grad_norm"]["heads"] > cfg.clip for r in records[1:])  # clipping took part


@pytest.mark.slow
def test_two_sharded_processes_distill_as_one_process(token_files, tmp_path):
    """Distillation with LR_MB > 0 takes three backward passes per micro-batch, the KL's stopping at heads
    2..n's own weights: sharded over 2 processes, as in one."""
    cfg = tiny_config(token_files, tmp_path / "one", distill=0.5)
    reference = train(cfg, progress=False)
    run = torchrun(replace(cfg, out=str(tmp_path / "two")), 2, "--fsdp")
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_model(tmp_path / "two" / "final", reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("before", "after"),
    [("2", "1"), ("1", "2"), ("2 --fsdp", "1"), ("2 --fsdp", "2 --fsdp")],
    ids=["2-1", "1-2", "2fsdp-1", "2fsdp-2fsdp"],
)
def test_a_run_resumes_under_another_number_of_processes(token_files, tmp_path, one_process, before, after):
    """Checkpoints are full whatever wrote them: sharded ones resume unsharded and sharded again."""
    cfg, reference = one_process
    cfg = replace(cfg, out=str(tmp_path / "split"))
    out = tmp_path / "split"

    def run(processes, *extra):
        nproc, *flags = processes.split()
        if nproc == "1":
            kwargs = {"stop_at": 2} if "--stop-at" in extra else {"resume": True}
            train(cfg, progress=False, fsdp="--fsdp" in flags, **kwargs)
        else:
            done = torchrun(cfg, int(nproc), *flags, *extra)
            assert done.returncode == 0, done.stderr[-3000:]

    run(before, "--stop-at", "2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    run(after, "--resume")
    assert_same_model(out / "final", reference)
    assert [r["step"] for r in log_records(out)] == list(range(cfg.steps + 1))


@pytest.mark.slow
def test_a_global_batch_that_does_not_divide_gives_a_clear_error(token_files, tmp_path):
    cfg = tiny_config(token_files, tmp_path / "odd", batch_size=3)
    run = torchrun(cfg, 2)
    assert run.returncode != 0
    assert "--batch-size 3 (the global batch) does not divide by the 2 processes" in run.stderr
    assert not (tmp_path / "odd").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "overrides", [{"distill": 0.5}, {"num_token_heads": 1}], ids=["distill-shared", "one-head"]
)
def test_fsdp_in_one_process_trains_the_plain_model(token_files, tmp_path, overrides):
    """One process shards over a one-rank group: the same backward-per-source path as N ranks, here
    with distillation and LR_MB > 0 (three backward passes per micro-batch) and with one head."""
    cfg = tiny_config(token_files, tmp_path / "plain", **overrides)
    plain = train(cfg, progress=False)
    sharded = train(replace(cfg, out=str(tmp_path / "fsdp")), progress=False, fsdp=True)
    assert_same_model(sharded, plain)
    for got, want in zip(log_records(tmp_path / "fsdp"), log_records(tmp_path / "plain"), strict=True):
        assert got.get("val_loss") == pytest.approx(want.get("val_loss"), abs=ATOL)
        if "grad_norm" in want:
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    if cfg.num_token_heads == 1:  # the transformers copy is written from the gathered model too
        assert_same_model(tmp_path / "fsdp" / "final-gpt-neox", tmp_path / "plain" / "final-gpt-neox")


def test_each_rank_reads_its_contiguous_slice_of_the_global_batch(token_files):
    ids = np.arange(1000)
    whole = WindowSampler(ids, 9, 6, seed=3).batch(7)  # (6, 9)
    slices = [
        WindowSampler(ids, 9, 6, seed=3, rows=ProcessGroup(rank, 3).shard_rows(6)).batch(7)
        for rank in range(3)
    ]
    assert torch.equal(torch.cat(slices), whole)
    with pytest.raises(TrainingError, match=r"--batch-size 8 .* does not divide by the 3 processes"):
        ProcessGroup(0, 3).check_batch(8)
