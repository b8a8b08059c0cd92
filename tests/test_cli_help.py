"""Every option of dynamo-train, dynamo-eval, dynamo-data and dynamo-cooccur says what it means and, when it
has one, its default (issue 20, item 4), in the one style of runtime/help_format.py."""

from __future__ import annotations

import argparse

import pytest

from dynamo_export.cli.cooccur import build_parser as cooccur_parser
from dynamo_export.cli.data import build_parser as data_parser
from dynamo_export.cli.eval import build_parser as eval_parser
from dynamo_export.cli.train import build_parser as train_parser
from runtime.help_format import HelpFormatter


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    found = [("train", train_parser()), ("eval", eval_parser()), ("cooccur", cooccur_parser())]
    data = data_parser()
    found.append(("data", data))
    for action in data._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [(f"data {name}", sub) for name, sub in action.choices.items()]
    return found


PARSERS = _parsers()


@pytest.mark.parametrize("name,parser", PARSERS, ids=[name for name, _ in PARSERS])
def test_every_option_has_a_meaning_and_shows_its_default(name, parser):
    assert parser.formatter_class is HelpFormatter
    text = " ".join(parser.format_help().split())  # undo the wrapping
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{name} {action.option_strings} has no help"
        if any(action.default is none for none in (None, False, argparse.SUPPRESS)):
            continue
        assert "default" in action.help or f"(default: {action.default})" in text, (
            name,
            action.option_strings,
        )
    assert "(default: None)" not in text and "(default: False)" not in text


def test_a_zero_default_is_shown_not_mistaken_for_no_default():
    assert "(default: 0)" in " ".join(train_parser().format_help().split())  # --seed 0
