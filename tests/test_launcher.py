"""The console scripts' launcher: a missing extra ends in one line naming it, before any heavy import."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from runtime import launcher

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")

ROOT = Path(__file__).resolve().parents[1]
EXPORT_INSTALL = 'pip install "dynamo-export[export]"'


def _scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_console_script_goes_through_the_launcher():
    scripts = _scripts()
    assert set(scripts) == set(launcher.COMMANDS)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module == "runtime.launcher", name
        assert callable(getattr(launcher, function)), name
    # The torch-side commands need the export extra; the runtime's, the benchmark's and the counter's
    # (numpy; its --engine spark names the spark extra itself) need none.
    needs = {name: c.extra for name, c in launcher.COMMANDS.items()}
    assert needs == {
        "dynamo-data": "export",
        "dynamo-train": "export",
        "dynamo-eval": "export",
        "dynamo-cooccur": None,
        "dynamo-export": "export",
        "dynamo-generate": None,
        "dynamo-bench": None,
    }


def test_every_command_target_exists():
    for name, command in launcher.COMMANDS.items():
        module, _, function = command.target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_extra_requirements_read_the_markers():
    requires = [
        "numpy>=1.26.4,<3",
        'torch==2.13.0; extra == "export"',
        "transformers<4.58,>=4.56 ; extra == 'export'",
        'onnxruntime-gpu<2,>=1.27; extra == "gpu"',
        'pytest<10,>=8; extra == "dev"',
    ]
    assert launcher.extra_requirements("export", requires) == ["torch", "transformers"]
    assert launcher.extra_requirements("gpu", requires) == ["onnxruntime-gpu"]
    assert launcher.extra_requirements("nothing", requires) == []


def test_the_export_extra_in_pyproject_is_what_the_launcher_checks():
    """The metadata's extra is pyproject's: torch and the exporter's stack, not the base install's."""
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [f'{req}; extra == "export"' for req in spec["optional-dependencies"]["export"]]
    names = launcher.extra_requirements("export", lines)
    assert {"torch", "transformers", "onnx", "onnxscript"} <= set(names)
    base = {launcher._NAME.match(req).group(1) for req in spec["dependencies"]}
    assert not base & set(names), "a base dependency is repeated in the export extra"
    assert {"psutil", "tqdm"} <= base  # dynamo-bench runs from the base install


def test_a_missing_extra_is_one_line_and_nothing_is_imported(monkeypatch, tmp_path, capsys):
    (tmp_path / "fake_heavy_cli.py").write_text(
        "raise AssertionError('imported before the extra was checked')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(launcher.COMMANDS, "dynamo-export", launcher.Command("fake_heavy_cli:main", "export"))
    monkeypatch.setattr(launcher, "_installed", lambda name: name not in ("torch", "onnx"))
    monkeypatch.setattr(sys, "argv", ["dynamo-export", "--help"])
    assert launcher.dynamo_export() == launcher.EXIT_MISSING_EXTRA
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith('dynamo-export: error: needs the "export" extra (missing: torch, onnx)')
    assert err.rstrip().endswith(EXPORT_INSTALL)
    assert "fake_heavy_cli" not in sys.modules


def test_a_module_missing_at_import_names_the_extra(monkeypatch, tmp_path, capsys):
    """Out-of-date (or absent) metadata: the command's own import fails, the same one line follows."""
    (tmp_path / "fake_torch_cli.py").write_text(
        "import torch_that_is_not_installed\n\ndef main():\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(launcher.COMMANDS, "dynamo-fake", launcher.Command("fake_torch_cli:main", "export"))
    monkeypatch.setattr(launcher, "missing_distributions", lambda extra: [])
    assert launcher.launch("dynamo-fake") == launcher.EXIT_MISSING_EXTRA
    err = capsys.readouterr().err
    assert err == (
        "dynamo-fake: error: needs the \"export\" extra (module 'torch_that_is_not_installed' is missing): "
        f"{EXPORT_INSTALL}\n"
    )


def test_a_broken_own_module_is_not_blamed_on_an_extra(monkeypatch, tmp_path):
    (tmp_path / "fake_own_cli.py").write_text("import runtime.no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(launcher.COMMANDS, "dynamo-own", launcher.Command("fake_own_cli:main", "export"))
    monkeypatch.setattr(launcher, "missing_distributions", lambda extra: [])
    with pytest.raises(ModuleNotFoundError, match=r"runtime\.no_such_module"):
        launcher.launch("dynamo-own")


def test_commands_without_an_extra_run_their_main(monkeypatch, tmp_path):
    (tmp_path / "fake_plain_cli.py").write_text("import sys\n\ndef main():\n    return len(sys.argv)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(launcher.COMMANDS, "dynamo-plain", launcher.Command("fake_plain_cli:main", None))
    monkeypatch.setattr(launcher, "missing_distributions", lambda extra: pytest.fail("checked an extra"))
    monkeypatch.setattr(sys, "argv", ["dynamo-plain", "a", "b"])
    assert launcher.launch("dynamo-plain") == 3


def test_the_installed_extra_passes(monkeypatch):
    """In the development install every extra is there: the real commands load."""
    assert launcher.missing_distributions("export") == []
    assert callable(launcher.load_main("dynamo-export"))
