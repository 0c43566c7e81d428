"""Injection strategies: how control branches are combined and added to the U-Net.

A control branch (one ControlNet, its hint, weight, window and mask) returns a
:class:`Residuals` -- one tensor per U-Net skip connection plus one for the middle block -- that
is already multiplied by the branch's own weight (or schedule value) and mask. The strategy
receives the U-Net's own skip features ``h`` and middle feature ``mid`` together with the list of
branch residuals, and returns what is *added* to them (ControlNet paper, Sec. 3.2: the locked
block's output plus the zero-convolved trainable copy). This is the one place where the papers
differ; everything else (the sampling loop, the runners, the branches) is shared.

Strategies are pure tensor maths over lists of tensors (torch only), so every one of them can be
tested on random tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from controlstack.errors import ControlstackError
from controlstack.residuals import Residuals


class Injection:
    """Base class. Subclasses set ``name`` and implement :meth:`__call__`."""

    name: ClassVar[str] = ""
    #: Controls act on the conditional CFG half only; the unconditional half gets none (guess mode).
    cond_only: bool = False

    def __call__(
        self, h: list[torch.Tensor], mid: torch.Tensor, branches: list[Residuals]
    ) -> Residuals | None:
        """Return what is added to ``h`` and ``mid``, or None when nothing is (no active branch)."""
        raise NotImplementedError


def sum_residuals(branches: list[Residuals]) -> Residuals:
    """Composition by addition (ControlNet paper, Sec. 4 "multiple conditions"), in branch order
    (diffusers' ``MultiControlNetModel`` adds them in the same order, so floats match)."""
    downs = list(branches[0].downs)
    mid = branches[0].mid
    for b in branches[1:]:
        downs = [d + e for d, e in zip(downs, b.downs)]
        mid = mid + b.mid
    return Residuals(downs, mid)


_REGISTRY: dict[str, Callable[..., Injection]] = {}


def register(*names: str):
    """Class decorator: register an injection strategy under one or more names."""

    def deco(cls):
        for n in names:
            if n in _REGISTRY:
                raise ValueError(f"injection '{n}' registered twice")
            _REGISTRY[n] = cls
        return cls

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def make_injection(name: str, **kwargs) -> Injection:
    """Build a strategy by name; unknown names fail with the list of known ones."""
    if name not in _REGISTRY:
        raise ControlstackError(f"unknown mode '{name}'; choose one of {', '.join(available())}")
    return _REGISTRY[name](**kwargs)
