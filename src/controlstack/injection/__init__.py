"""Injection strategies (``sum``, the sd-webui control modes, Minimal Impact). See ``base.py``."""

from controlstack.injection import mi as _mi  # noqa: F401  (registers mi)
from controlstack.injection import modes as _modes  # noqa: F401  (registers sum/balanced/prompt/controlnet/guess)
from controlstack.injection.base import Injection, available, make_injection, register
from controlstack.injection.modes import CONTROL_MODE_TABLE, WebuiMode
from controlstack.residuals import Residuals

__all__ = ["CONTROL_MODE_TABLE", "Injection", "Residuals", "WebuiMode", "available", "make_injection", "register"]
