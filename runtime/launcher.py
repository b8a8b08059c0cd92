"""The console scripts' entry points: each checks that its extra is installed before importing anything.

`pip install dynamo-export` (no extras) installs every console script, but only
`dynamo-generate`, `dynamo-bench` and `dynamo-cooccur` run on the base install;
the others need PyTorch and friends, the `export` extra. Their entry points live here, in the
torch-free layer, so that a missing extra ends in one line naming the install
command instead of an import traceback:

    $ dynamo-export --help
    dynamo-export: error: needs the "export" extra (missing: torch, transformers, ...): pip install "dynamo-export[export]"

What an extra holds is read from the installed distribution's metadata (pyproject's
[project.optional-dependencies]), so the list is spelled once. A module that is
still missing when the command's own imports run (metadata out of date, or no
metadata at all) ends the same way, naming the module.
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass
from importlib import metadata

DISTRIBUTION = "dynamo-export"
EXIT_MISSING_EXTRA = 2  # the project's CLIs exit 2 on every error they report in one line
# Top-level packages of this distribution: a missing one of these is a broken install, not a missing extra.
OWN_PACKAGES = frozenset({"runtime", "converters", "dynamo_export", "dynamo_bench"})


@dataclass(frozen=True)
class Command:
    target: str  # "module:function"; the function takes no arguments and returns the exit status
    extra: str | None  # the optional-dependencies group it needs; None: the base install suffices


COMMANDS = {
    "dynamo-data": Command("dynamo_export.cli.data:main", "export"),
    "dynamo-train": Command("dynamo_export.cli.train:main", "export"),
    "dynamo-eval": Command("dynamo_export.cli.eval:main", "export"),
    # numpy/scipy counting; --engine spark names the "spark" extra itself when pyspark is missing
    "dynamo-cooccur": Command("dynamo_export.cli.cooccur:main", None),
    "dynamo-export": Command("converters.cli:main", "export"),
    "dynamo-generate": Command("runtime.cli:main", None),
    "dynamo-bench": Command("dynamo_bench.cli:main", None),
}


class MissingExtra(Exception):
    """A command's extra (or a module from it) is not installed; the message is the one line to print."""


def install_command(extra: str) -> str:
    return f'pip install "{DISTRIBUTION}[{extra}]"'


_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def extra_requirements(extra: str, requires: list[str] | None = None) -> list[str]:
    """Distribution names in `extra`, from Requires-Dist lines ('torch==2.13.0; extra == "export"').

    `requires` defaults to the installed distribution's; PackageNotFoundError when it is not installed.
    """
    if requires is None:
        requires = metadata.requires(DISTRIBUTION) or []
    names = []
    for line in requires:
        requirement, _, marker = line.partition(";")
        found = _EXTRA_MARKER.search(marker)
        name = _NAME.match(requirement)
        if found and found.group(1) == extra and name:
            names.append(name.group(1))
    return names


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def missing_distributions(extra: str) -> list[str]:
    """The distributions of `extra` that are not installed; [] when this distribution has no metadata
    (run from a source tree: the import-time check below still applies)."""
    try:
        names = extra_requirements(extra)
    except metadata.PackageNotFoundError:
        return []
    return [name for name in names if not _installed(name)]


def check_extra(command: str) -> None:
    """Raise MissingExtra when `command` needs an extra that is not (completely) installed."""
    extra = COMMANDS[command].extra
    if extra is None:
        return
    missing = missing_distributions(extra)
    if missing:
        raise MissingExtra(
            f'{command}: error: needs the "{extra}" extra (missing: {", ".join(missing)}): '
            f"{install_command(extra)}"
        )


def load_main(command: str):
    """Import the command's module and return its main function, after checking its extra."""
    spec = COMMANDS[command]
    check_extra(command)
    module_name, _, function = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if spec.extra is None or not top or top in OWN_PACKAGES:
            raise
        raise MissingExtra(
            f'{command}: error: needs the "{spec.extra}" extra (module {top!r} is missing): '
            f"{install_command(spec.extra)}"
        ) from exc
    return getattr(module, function)


def launch(command: str) -> int:
    """Run `command` with sys.argv; its exit status, or EXIT_MISSING_EXTRA with one line on stderr."""
    try:
        main = load_main(command)
    except MissingExtra as exc:
        print(exc, file=sys.stderr)
        return EXIT_MISSING_EXTRA
    status = main()
    return 0 if status is None else status


# One function per console script ([project.scripts] in pyproject.toml points at these).
def dynamo_data() -> int:
    return launch("dynamo-data")


def dynamo_train() -> int:
    return launch("dynamo-train")


def dynamo_eval() -> int:
    return launch("dynamo-eval")


def dynamo_cooccur() -> int:
    return launch("dynamo-cooccur")


def dynamo_export() -> int:
    return launch("dynamo-export")


def dynamo_generate() -> int:
    return launch("dynamo-generate")


def dynamo_bench() -> int:
    return launch("dynamo-bench")
