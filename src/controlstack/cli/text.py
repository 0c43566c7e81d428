"""Docstrings as --help text: reST inline literals (``x``) printed as plain x."""

from __future__ import annotations

import argparse

from controlstack.errors import ControlstackError


def plain(text: str) -> str:
    return text.replace("``", "")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, except where there is none to show (None, False, [],
    "") -- those flags say in their own help what happens when they are left out -- and where the
    help already names it (``(default: the bundled model)``, ``%(default)s``): never two defaults."""

    def _get_help_string(self, action):
        # by identity / type: a default of 0 is a value to show, though 0 == False
        nothing = action.default is None or action.default is False or action.default in ([], "", argparse.SUPPRESS)
        if nothing or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def int_flag(name: str, text: str) -> int:
    """A flag's integer, parsed here rather than by argparse so a bad value is one line and exit 2."""
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ControlstackError(f"--{name} must be an integer, got {text!r}") from None

