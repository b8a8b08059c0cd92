"""One --help style for every command: each option shows its default, and docstrings keep their layout."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says what the default is
    or there is none (None, False for a flag): argparse's own formatter prints "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or any(action.default is none for none in (None, False, argparse.SUPPRESS))  # 0 is a default
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"
