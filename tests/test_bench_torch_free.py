"""dynamo-bench without torch: what runs, what is skipped and said so; the per-call figures; --compare;
the device record; the provider checks (scripts/device_check.sh) on the CPU provider.

The torch-free runs happen in a subprocess whose imports of torch, transformers, optimum, onnx and
matplotlib fail and whose find_spec reports them absent, as in the runtime-only install (the real
install is tests/test_install.py's, marked slow).
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dynamo_bench import compare, latency, providers
from dynamo_bench.cli import main as bench_main
from dynamo_bench.env import cpu_model_from_cpuinfo
from dynamo_bench.errors import BenchError
from dynamo_bench.latency import Call, Sample
from dynamo_bench.report import device_line
from runtime import DynaMoRuntime

ROOT = Path(__file__).resolve().parents[1]
EXPORT_INSTALL = 'pip install "dynamo-export[export]"'
JUDGE_INSTALL = 'pip install "dynamo-export[judge]"'
BLOCKED = ("torch", "transformers", "optimum", "onnx", "onnxscript", "safetensors", "matplotlib")

# Runs dynamo-bench's main(argv) with the PyTorch stack and matplotlib absent; prints the modules of
# that stack that got imported anyway as the last stderr line.
TORCH_FREE = textwrap.dedent(
    f"""
    import importlib.util, json, sys
    BLOCKED = {BLOCKED!r}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)

    sys.meta_path.insert(0, Block())
    _find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, package=None: (
        None if name.partition(".")[0] in BLOCKED else _find_spec(name, package)
    )
    from dynamo_bench.cli import main
    try:
        main(sys.argv[1:])
    finally:
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
        print("imported: " + json.dumps(leaked), file=sys.stderr)
    """
)


def run_torch_free(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TORCH_FREE, *argv], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


@pytest.fixture(scope="module")
def torch_free_run(bpe_models, tmp_path_factory):
    """One torch-free run with --baseline and --plot: both need what is missing, so both are skipped."""
    out = tmp_path_factory.mktemp("torch-free")
    done = run_torch_free(
        "--artifact",
        str(bpe_models / "t3-onnx"),
        "--baseline",
        str(bpe_models / "base"),
        "--plot",
        str(out / "plot.png"),
        "--max-new-tokens",
        "8",
        "--eps-b",
        "0.5",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--seeds",
        "0",
        "--threads",
        "1",
        "--json",
        str(out / "run.json"),
        "--markdown",
        str(out / "run.md"),
        "--no-progress",
    )
    return out, done


def test_bench_runs_without_torch_and_says_what_it_skipped(torch_free_run, bpe_models):
    out, done = torch_free_run
    assert done.returncode == 0, done.stderr
    *notes, imported = done.stderr.strip().splitlines()
    assert imported == "imported: []"
    result = json.loads((out / "run.json").read_text())
    assert list(result["runners"]) == ["ar", "dynamic eps_b=0.5", "verify", "verify alpha_c=0"]
    skipped = {(s["part"], s["what"]) for s in result["skipped"]}
    assert skipped == {
        ("plot", f"--plot {out / 'plot.png'}"),
        ("optimum", "the Optimum baseline"),
        ("pytorch", "the PyTorch baseline"),
        ("pytorch", f"judging with the checkpoint {bpe_models / 'base'}"),
        ("mauve", "MAUVE against the human continuations"),  # sentence embeddings need torch
    }
    assert not (out / "plot.png").exists()
    for s in result["skipped"]:
        install = {"plot": "pip install matplotlib", "mauve": JUDGE_INSTALL}.get(s["part"], EXPORT_INSTALL)
        assert s["install"] == install
        assert f"dynamo-bench: note: {s['note']}" in notes
    assert len(notes) == len(result["skipped"])
    # self-BLEU needs no torch (sacrebleu): it still judges every runner.
    assert all(r["quality"]["by_set"]["paper"]["self_bleu"] is not None for r in result["runners"].values())
    # The judge falls back to the artifact's own head 1 on ONNX Runtime, and says so.
    assert result["settings"]["judge"] == f"onnx:{bpe_models / 't3-onnx'}"
    assert "the artifact's own head 1 judges instead" in json.dumps(result["skipped"])
    env = result["environment"]
    assert env["versions"]["torch"] is not None  # installed here, only hidden from this run
    assert (
        env["onnxruntime"]["version"] and "CPUExecutionProvider" in env["onnxruntime"]["available_providers"]
    )
    assert env["session_providers"] == ["CPUExecutionProvider"]
    assert env["logical_cpus"] >= 1 and env["cpu_model"] and env["machine"]
    for label, run in result["runners"].items():
        lat = run["latency"]
        assert lat["peak_rss_mb"] > 10 and lat["sampling_share"]["median"] > 0, label
        per_call = lat["per_call"]
        assert per_call["ttft_ms"]["calls"] == 2 * len(result["settings"]["prompts"])  # rounds x prompts
        for name in ("ttft_ms", "decode_ms_per_pass", "decode_ms_per_token"):
            assert 0 < per_call[name]["p50"] <= per_call[name]["p90"] < math.inf, (label, name)
        assert run["quality"]["by_set"]["all"]["judged_ppl"] > 1
    markdown = (out / "run.md").read_text()
    assert "Skipped on this install:" in markdown and EXPORT_INSTALL in markdown
    assert "## Latency per call" in markdown and "| verify alpha_c=0 |" in markdown
    assert "torch not installed" not in markdown  # torch is installed here; the run only could not use it


def test_scale_without_torch_is_one_line_naming_the_extra():
    done = run_torch_free("--scale", "--scale-sizes", "70m", "--no-progress")
    assert done.returncode == 2
    error, imported = done.stderr.strip().splitlines()
    assert error.startswith("dynamo-bench: error: --scale exports models and needs torch")
    assert error.endswith(EXPORT_INSTALL) and imported == "imported: []"


def _sample(ttft_ms: float, decode_ms: float, passes: int, tokens: int) -> Sample:
    stats = {
        "decode_s": decode_ms / 1000,
        "forward_passes": passes + 1,
        "new_tokens": tokens + 1,
        "first_pass_tokens": 1,
    }
    return Sample(tuple(range(tokens + 1)), (ttft_ms + decode_ms) / 1000, ttft_ms / 1000, stats)


def test_per_call_percentiles_are_over_every_call():
    # Ten calls: TTFT 1..10 ms; call i decodes 2i ms over 2 passes and 4 tokens.
    calls = [Call("x", i, 0, i % 2, _sample(i, 2 * i, 2, 4)) for i in range(1, 11)]
    per_call = latency.per_call_percentiles(calls)
    assert per_call["ttft_ms"] == {"p50": pytest.approx(5.5), "p90": pytest.approx(9.1), "calls": 10}
    assert per_call["decode_ms_per_pass"]["p50"] == pytest.approx(5.5)  # 2i / 2
    assert per_call["decode_ms_per_token"]["p90"] == pytest.approx(9.1 / 2)  # 2i / 4
    # transformers/Optimum calls carry no stats: one token per pass after the first token.
    hf = [Call("hf", 0, 0, 0, Sample((1, 2, 3, 4, 5), 0.010, 0.002))]
    figures = latency.per_call_percentiles(hf)
    assert figures["decode_ms_per_pass"]["p50"] == pytest.approx(2.0)  # 8 ms over 4 tokens
    assert figures["decode_ms_per_token"] == figures["decode_ms_per_pass"]
    single = [Call("y", 0, 0, 0, _sample(3, 0, 0, 0))]  # one pass only: no decode figures
    assert latency.per_call_percentiles(single)["decode_ms_per_pass"] == {
        "p50": None,
        "p90": None,
        "calls": 0,
    }


def test_compare_puts_runs_side_by_side(torch_free_run, tmp_path, capsys):
    out, _ = torch_free_run
    first = json.loads((out / "run.json").read_text())
    other = copy.deepcopy(first)
    other["environment"].update(cpu_model="Cortex-A76", device_model="Raspberry Pi 5 Model B Rev 1.0")
    other["environment"]["threads"] = None
    del other["runners"]["dynamic eps_b=0.5"]
    other["runners"]["ar"]["latency"]["tokens_per_s"]["median"] = 12.345
    other["runners"]["verify"]["latency"]["per_call"]["ttft_ms"].update(p50=40.0, p90=55.5)
    (tmp_path / "pi5.json").write_text(json.dumps(other))
    (tmp_path / "laptop.json").write_text(json.dumps(first))
    bench_main(
        [
            "--compare",
            str(tmp_path / "laptop.json"),
            str(tmp_path / "pi5.json"),
            "--markdown",
            str(tmp_path / "c.md"),
        ]
    )
    markdown = capsys.readouterr().out
    assert (tmp_path / "c.md").read_text().strip() == markdown.strip()
    assert "|  | laptop | pi5 |" in markdown
    assert "Cortex-A76 (Raspberry Pi 5 Model B Rev 1.0)" in markdown
    assert "cpu, ORT's default threads" in markdown and "cpu, 1 |" in markdown
    ar_tps = first["runners"]["ar"]["latency"]["tokens_per_s"]["median"]
    assert f"| ar | {ar_tps:.1f} | 12.3 |" in markdown
    assert "| dynamic eps_b=0.5 | " in markdown and markdown.count("– |") >= 1  # pi5 lacks the runner
    assert "| 40.00 / 55.50 |" in markdown
    assert "| skipped | plot, optimum, pytorch, mauve | plot, optimum, pytorch, mauve |" in markdown


def test_compare_rejects_what_it_cannot_read(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"schema": "dynamo-bench/1", "runners": {}}))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(BenchError, match="at least two"):
        compare.load_results([good])
    with pytest.raises(BenchError) as err:
        compare.load_results([good, tmp_path / "bad.json", tmp_path / "other.json", tmp_path / "none.json"])
    for name in ("bad.json", "other.json", "none.json"):
        assert name in str(err.value)
    assert "good.json" not in str(err.value)
    with pytest.raises(SystemExit) as exit_:
        bench_main(["--compare", str(good), str(tmp_path / "bad.json")])
    assert exit_.value.code == 2
    err_line = capsys.readouterr().err
    assert err_line.startswith("dynamo-bench: error: cannot compare: ") and err_line.count("\n") == 1
    labels = [label for label, _ in compare.load_results([good, good, good])]
    assert labels == ["good", "good (2)", "good (3)"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--artifact", "a", "--compare", "x.json", "y.json"], "separate jobs"),
        (["--compare", "x.json", "y.json", "--json", "z.json"], "drop --json"),
        (["--compare", "x.json", "y.json", "--plot", "p.png"], "--plot and --plot-shares draw the artifact"),
        (["--scale", "--plot-shares", "p.png"], "--plot and --plot-shares draw the artifact"),
        ([], "give --artifact DIR, --scale"),
    ],
)
def test_bench_modes_are_exclusive(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cpu_names_from_cpuinfo():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n"
    pi4 = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4\n"
    armv7 = "Processor\t: ARMv7 Processor rev 4 (v7l)\nHardware\t: BCM2709\n"
    assert cpu_model_from_cpuinfo(x86) == "AMD EPYC 7B13"
    assert cpu_model_from_cpuinfo(pi4) == "BCM2835"
    assert cpu_model_from_cpuinfo(armv7) == "ARMv7 Processor rev 4 (v7l)"
    assert cpu_model_from_cpuinfo("processor\t: 0\n") is None


def test_device_line_names_cpu_board_gpu_and_providers():
    env = {
        "cpu_model": "Intel Xeon",
        "device_model": None,
        "physical_cores": 8,
        "logical_cpus": 16,
        "memory_total_gb": 125.7,
        "gpus": [{"name": "NVIDIA H200", "memory": "143771 MiB", "driver": "580.159.03"}],
        "onnxruntime": {
            "version": "1.31.1",
            "device": "GPU",
            "available_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        },
        "versions": {"onnxruntime": None},
    }
    assert device_line(env) == (
        "Intel Xeon; 8 cores / 16 logical CPUs; 125.7 GB; GPU NVIDIA H200 (143771 MiB, driver 580.159.03); "
        "onnxruntime 1.31.1 (providers: CUDA, CPU)"
    )
    old = {**env, "gpus": None, "physical_cores": None}
    del old["onnxruntime"]
    old["versions"] = {"onnxruntime": "1.27.0"}  # a result written before the ONNX Runtime record
    assert device_line(old) == "Intel Xeon; ? cores / 16 logical CPUs; 125.7 GB; onnxruntime 1.27.0"


# -- the provider checks (dynamo_bench.providers), on the CPU provider ---------------------------------


def test_provider_checks_pass_on_cpu_and_write_their_json(tiny_artifact, tmp_path, capsys):
    art = str(tiny_artifact.out)
    code = providers.main(
        [
            *("--fp32", art, "--provider", "cpu", "--prompts", "2", "--seeds", "0,1"),
            *("--max-new-tokens", "6", "--json", str(tmp_path / "check.json")),
        ]
    )
    assert code == 0, capsys.readouterr().out
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["passed"]
    (parity,) = result["parity"]
    assert parity["max_abs_diff"] == [0.0, 0.0, 0.0] and parity["top1_agreement"] == [1.0, 1.0, 1.0]
    assert parity["positions"] > 2 * 5  # each prompt plus its greedy continuation
    (binding,) = result["io_binding"]
    assert binding["generations"] == {"ar": 4, "dynamic": 4, "verify": 4} == binding["equal"]
    assert "Overall: PASSED." in capsys.readouterr().out


def test_parity_fails_on_wrong_logits(tiny_artifact):
    """Negative control: a session whose logits are off (a stale position, say) fails, per head."""
    reference = providers.load_runtime(tiny_artifact.out, "cpu", 1, io_binding=False)
    candidate = providers.load_runtime(tiny_artifact.out, "cpu", 1, io_binding=True)
    cases = [providers.schedule(reference, p, continuation=6) for p in providers.prompt_ids(reference, 2)]
    assert [len(p) for p in cases[0][1:]] == [1, 3, 1, 1]  # 6 greedy tokens in passes of 1 and 3
    forward = candidate.session.forward

    def shifted(cache, tokens, positions, run_options=None):
        logits = forward(cache, tokens, positions, run_options)
        return logits + np.where(np.arange(logits.shape[-1]) == 7, 50.0, 0.0)  # token 7 always wins

    candidate.session.forward = shifted
    result = providers.logits_parity(
        "shifted", reference.session, candidate.session, cases, providers.TOLERANCES["fp32"]
    )
    assert not result.passed
    assert result.max_abs_diff == [pytest.approx(50.0)] * 3
    assert [f.split(":")[0] for f in result.failures] == [
        "head 1",
        "head 1",
        "head 2",
        "head 2",
        "head 3",
        "head 3",
    ]
    loose = providers.Tolerance(max_abs_diff=None, min_top1=0.0)
    assert providers.logits_parity("loose", reference.session, candidate.session, cases, loose).passed


def test_generation_agreement_reports_the_first_divergence(tiny_artifact):
    left = providers.load_runtime(tiny_artifact.out, "cpu", 1)
    right = DynaMoRuntime.load(tiny_artifact.out, threads=1)
    generate = right.generate

    def altered(prompt, max_new_tokens, config, seed):
        result = generate(prompt, max_new_tokens, config, seed)
        if config.mode == "verify" and seed == 1:
            result.token_ids[2] = (result.token_ids[2] + 1) % 100
        return result

    right.generate = altered
    prompts = providers.prompt_ids(left, 2)
    required = providers.generation_agreement("x", left, right, prompts, (0, 1), 6, required=True)
    assert not required.passed
    assert required.equal == {"ar": 4, "dynamic": 4, "verify": 2}
    assert required.divergences == [
        {"mode": "verify", "prompt": 0, "seed": 1, "token": 2},
        {"mode": "verify", "prompt": 1, "seed": 1, "token": 2},
    ]
    reported = providers.generation_agreement("y", left, right, prompts, (1,), 6, required=False)
    assert reported.passed and reported.equal["verify"] == 0


def test_cuda_that_fell_back_to_cpu_is_refused(tiny_artifact):
    rt = DynaMoRuntime.load(tiny_artifact.out, threads=1)  # a session on the CPU provider
    with pytest.raises(BenchError, match="CUDA execution provider did not load"):
        providers.check_session_provider(rt, "cuda")
    providers.check_session_provider(rt, "cpu")
