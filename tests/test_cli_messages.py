"""What the commands tell a newcomer (issue 20's small items): every option's default in --help, the
stats line after --stream, why a generation stopped at the context, what the cache layers are, and
errors that name the artifact asked for rather than an internal staging folder."""

from __future__ import annotations

import argparse

import pytest

import converters.artifact as artifact_module
from converters.cli import build_parser as export_parser
from converters.cli import summary as export_summary
from converters.errors import ExportError
from dynamo_bench.cli import build_parser as bench_parser
from runtime import DynaMoRuntime, SamplingConfig
from runtime.cli import build_parser as generate_parser
from runtime.cli import main as generate_main
from runtime.cli import summary as generate_summary


@pytest.mark.parametrize(
    "parser", [generate_parser, export_parser, bench_parser], ids=["generate", "export", "bench"]
)
def test_every_option_with_a_default_shows_it(parser):
    built = parser()
    text = " ".join(built.format_help().split())  # undo the wrapping
    for action in built._actions:
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            continue
        assert action.help and ("default" in action.help or f"(default: {action.default}" in text), (
            action.option_strings
        )
    assert "(default: None)" not in text


def test_stream_prints_the_stats_line(tiny_artifact, capsys):
    code = generate_main(
        ["--artifact", str(tiny_artifact.out), "--prompt", "t1 t2 t3", "--stream", "--mode", "verify", "--seed", "0",
         "--max-new-tokens", "8", "--stop", "never"]
    )  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "tokens in" in err and "tokens/pass" in err


def test_a_generation_stopped_by_the_context_says_why(tiny_artifact):
    rt = DynaMoRuntime.load(tiny_artifact.out)
    context = rt.manifest.model.context_length
    prompt = [1 + i % 50 for i in range(context - 3)]
    result = rt.generate(prompt, 64, SamplingConfig(mode="ar", stop=()), seed=0)
    assert result.stats.stop_reason == "context"
    lines = generate_summary(result.stats, SamplingConfig(mode="ar"), context)
    assert any(f"left room for only {result.stats.new_tokens} new ones" in line for line in lines)


def test_the_export_summary_explains_the_cache_layers(tiny_artifact):
    model = tiny_artifact.manifest.model
    line = export_summary(tiny_artifact).splitlines()[0]
    stem = model.num_cache_layers - model.num_token_heads
    assert f"{model.num_cache_layers} cache layers ({stem} stem + head 1's + 2 extra heads')" in line


def test_export_errors_name_the_artifact_not_the_staging_folder(tiny_dynamo_dir, tmp_path, monkeypatch):
    def fail_in_staging(plan, staging, step, result):
        raise ExportError(f"something went wrong in {staging / 'artifact' / 'model.onnx'}")

    monkeypatch.setattr(artifact_module, "_build", fail_in_staging)
    out = tmp_path / "my-artifact"
    with pytest.raises(ExportError) as raised:
        artifact_module.export_artifact(tiny_dynamo_dir, out=out, progress=False)
    assert str(out / "model.onnx") in str(raised.value) and ".tmp-" not in str(raised.value)
