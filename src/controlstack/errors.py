"""The one exception type for user errors.

Code behind the validation boundary (``io/images.py``, the ``Control`` constructor, config
dataclasses) trusts its inputs and raises ordinary exceptions on bugs. Anything a *user* can get
wrong raises :class:`ControlstackError` with a message that names the problem and the fix; the CLI
prints that message as one line on stderr and exits with code 2.
"""

from __future__ import annotations


class ControlstackError(Exception):
    """A problem with the user's input: message says what is wrong and how to fix it."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ControlstackError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ControlstackError(message)
