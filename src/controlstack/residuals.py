"""What a control branch outputs and an injection strategy combines: one tensor per U-Net skip
connection plus one for the middle block (ControlNet paper, Sec. 3.2: the zero-convolved outputs of
the trainable copy added to the locked U-Net's skips). A leaf module (torch only): the models that
make residuals and the strategies that combine them both import it, and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Residuals:
    """What one control branch (or a strategy) adds: one tensor per skip, one for the middle."""

    downs: list[torch.Tensor]
    mid: torch.Tensor

    def scaled(self, weights: list[float] | torch.Tensor) -> Residuals:
        """Multiply skip i by ``weights[i]`` and the middle by ``weights[-1]``."""
        return Residuals([d * w for d, w in zip(self.downs, weights)], self.mid * weights[-1])

    def times(self, weight: float) -> Residuals:
        """Every tensor times ``weight``; itself at exactly 1 (``x * 1.0`` is ``x``, bit for bit, and
        skipping saves an elementwise pass per tensor per step at the usual weight)."""
        return self if weight == 1.0 else Residuals([d * weight for d in self.downs], self.mid * weight)
