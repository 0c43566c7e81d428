"""Docstrings as --help text: reST inline literals (``x``) printed as plain x."""

from __future__ import annotations

import argparse


def plain(text: str) -> str:
    return text.replace("``", "")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, except where there is none to show (None, False, [])
    -- those flags say in their own help what happens when they are left out."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
