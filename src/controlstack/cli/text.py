"""Docstrings as --help text: reST inline literals (``x``) printed as plain x."""

from __future__ import annotations


def plain(text: str) -> str:
    return text.replace("``", "")
