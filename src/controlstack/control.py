"""What a user asks for (:class:`Control`) and what the denoiser runs (:class:`Branch`).

A ``Control`` is validated on construction (the one place user values become trusted values):
the ControlNet (a bundled name, a path or a ``ControlNetModel``), the condition image, its weight
-- a float or a strength schedule of keyframes ``[(progress, weight), ...]`` interpolated
linearly in sampling progress (0 at the first step, 1 at the last) --, the diffusers start/end
window (None: the model's recommended one, else the whole run), an optional region mask and the
resize mode.

A ``Branch`` is one prepared control inside one run: the ControlNet runner, the hint features
computed once (not per step), and the weight / window / mask rules applied to the residuals it
returns. Masks are resized to each residual's resolution by area averaging, so soft masks stay
soft and a mask of ones (or zeros) is exactly ones (zeros) at every resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from controlstack.errors import ControlstackError
from controlstack.io.images import RESIZE_MODES, mask_to_array, validate_image
from controlstack.models.union import is_union
from controlstack.residuals import Residuals
from controlstack.sampling.loop import Step

Weight = float | Sequence[tuple[float, float]]


def validate_weight(weight: Any) -> float | tuple[tuple[float, float], ...]:
    """A float, or keyframes ``[(progress, weight), ...]`` with progress in [0, 1] ascending."""
    if isinstance(weight, (int, float)) and not isinstance(weight, bool):
        if not np.isfinite(weight):
            raise ControlstackError(f"control weight must be finite, got {weight}")
        return float(weight)
    try:
        frames = tuple((float(p), float(w)) for p, w in weight)
    except (TypeError, ValueError):
        raise ControlstackError(
            f"control weight must be a number or keyframes [(progress, weight), ...], got {weight!r}"
        )
    if not frames:
        raise ControlstackError("control weight schedule is empty; give at least one (progress, weight)")
    ps = [p for p, _ in frames]
    if any(not 0.0 <= p <= 1.0 for p in ps) or ps != sorted(ps):
        raise ControlstackError(f"schedule progress values must be ascending in [0, 1], got {ps}")
    if not all(np.isfinite(w) for _, w in frames):
        raise ControlstackError("schedule weights must be finite")
    return frames


def weight_at(weight: float | tuple[tuple[float, float], ...], progress: float) -> float:
    """The weight at ``progress``: constant, or linear between keyframes (flat outside them)."""
    if isinstance(weight, float):
        return weight
    ps = [p for p, _ in weight]
    ws = [w for _, w in weight]
    return float(np.interp(progress, ps, ws))


@dataclass
class Control:
    """One control: ``Control(model, image, weight=1.0, start=None, end=None, mask=None)``.

    model        -- a bundled ControlNet name ('canny', 'depth', ...), a path, or a ControlNetModel
    image        -- the condition (PIL image or array), used as it is unless ``preprocess`` is set
    weight       -- float, or strength schedule [(progress, weight), ...]
    start, end   -- active while ``not (i/N < start or (i+1)/N > end)`` (diffusers' rule); None: unset,
                    the pipeline resolves it to the model's recommended window, else 0.0 / 1.0
    mask         -- region (PIL/array, soft allowed) where the control acts; None = everywhere
    resize_mode  -- just_resize | crop_and_resize | resize_and_fill (to the output size)
    preprocess   -- run an annotator on ``image`` first: the named one, or (True) the one of the condition
                    the ControlNet takes (``annotators.for_control``: mi-canny -> canny)
    task         -- the condition type for an Omni ControlNet ('depth', 'canny', ...): its task
                    token is prefixed to the prompt the ControlNet sees
    """

    model: Any
    image: Any
    weight: Weight = 1.0
    start: float | None = None
    end: float | None = None
    mask: Any = None
    resize_mode: str = "just_resize"
    preprocess: bool | str = False
    annotator_params: dict = field(default_factory=dict)
    task: str | None = None

    def __post_init__(self):
        if self.model is None or (isinstance(self.model, str) and not self.model):
            raise ControlstackError("control model is empty; pass a bundled name, a path or a ControlNetModel")
        self.image = validate_image(self.image, "control image")
        self.weight = validate_weight(self.weight)
        for name in ("start", "end"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer))):
                raise ControlstackError(f"control window {name} must be a number in [0, 1] or None, got {v!r}")
        self.start, self.end = (None if v is None else float(v) for v in (self.start, self.end))
        start, end = 0.0 if self.start is None else self.start, 1.0 if self.end is None else self.end
        if not (0.0 <= start <= end <= 1.0):
            raise ControlstackError(
                f"control window start={self.start}, end={self.end} is invalid; need 0 <= start <= end <= 1"
            )
        if self.mask is not None:
            self.mask = mask_to_array(self.mask, "control mask")
        if self.task is not None and (not isinstance(self.task, str) or not self.task):
            raise ControlstackError(f"control task must be a non-empty name such as 'depth', got {self.task!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ControlstackError(
                f"unknown resize mode '{self.resize_mode}'; choose one of {', '.join(RESIZE_MODES)}"
            )


def in_window(start: float | None, end: float | None, step: Step) -> bool:
    """diffusers' ``controlnet_keep`` rule: off iff ``i/N < start or (i+1)/N > end`` (an unset
    bound, None, is the whole run's: 0 / 1)."""
    i, n = step.index, step.count
    start, end = 0.0 if start is None else start, 1.0 if end is None else end
    return not (i / n < start or (i + 1) / n > end)


class RegionMask:
    """A control's region mask, resized to each residual's resolution (area averaging, cached)."""

    def __init__(self, mask: np.ndarray | None):
        if mask is not None and float(mask.min()) == 1.0:
            mask = None  # a mask of ones is no mask: skip the multiply so results are bit-identical
        self.mask = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask))[None, None]
        self._sizes: dict[tuple[int, int], torch.Tensor] = {}

    def at(self, like: torch.Tensor) -> torch.Tensor:
        size = tuple(like.shape[-2:])
        if size not in self._sizes:
            m = self.mask.to(like.device, torch.float32)
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="area") if size[0] <= m.shape[-2] else \
                    F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            self._sizes[size] = m.to(like.dtype)
        return self._sizes[size]

    def __call__(self, res: Residuals) -> Residuals:
        if self.mask is None:
            return res
        return Residuals([d * self.at(d) for d in res.downs], res.mid * self.at(res.mid))


class Branch:
    """One control inside one run: a ControlNet runner with its cached hint features."""

    def __init__(self, runner, hint_features: torch.Tensor, weight, start: float, end: float,
                 mask: np.ndarray | None = None,
                 encoder_hidden_states: tuple[torch.Tensor | None, torch.Tensor] | None = None):
        self.runner = runner
        self.hint_features = hint_features          # computed once per run
        self.weight = weight                        # float or keyframes (validated)
        self.start, self.end = start, end
        self.region = RegionMask(mask)
        # own text embedding (uncond, cond) -- Omni's "<task> prompt"; None: the denoiser's
        self.encoder_hidden_states = encoder_hidden_states
        self.last: Residuals | None = None  # the runner's last output, unweighted (models.tiers.Reuse)

    def active(self, step: Step) -> bool:
        return in_window(self.start, self.end, step)

    def __call__(self, x, t, encoder_hidden_states, step: Step, cond_only: bool = False,
                 reuse: bool = False, added: dict | None = None) -> Residuals:
        """``x``: the CFG batch ``[uncond; cond]`` (or the cond half alone when ``cond_only`` or
        without CFG), ``encoder_hidden_states`` the matching text embedding, ``added`` the matching
        SDXL added conditions. ``reuse``: take the last computed residuals instead of running the
        ControlNet (weight and mask still apply)."""
        if reuse and self.last is not None:
            res = self.last
        else:
            if self.encoder_hidden_states is not None:
                uncond, cond = self.encoder_hidden_states
                both = uncond is not None and not cond_only and x.shape[0] == 2 * cond.shape[0]
                encoder_hidden_states = torch.cat([uncond, cond]) if both else cond
            kw = {"added_cond_kwargs": added} if added else {}
            res = self.last = self.runner(x, t, encoder_hidden_states, self.hint_features, **kw)
        return self.region(res.times(weight_at(self.weight, step.progress)))


def group_unions(controls: list[Control], resolve) -> list[Control | list[Control]]:
    """``controls`` in order, the controls of each union model (``resolve(model)`` -> the model)
    gathered into one list at the place of the first of them."""
    out: list = []
    groups: dict[int, list[Control]] = {}
    for c in controls:
        model = resolve(c.model)
        if not is_union(model):
            out.append(c)
        elif id(model) in groups:
            groups[id(model)].append(c)
        else:
            groups[id(model)] = [c]
            out.append(groups[id(model)])
    return out


class UnionBranch:
    """All the controls of one ControlNet-Union model in one run (``models/union.py``): one forward
    of its ``UnionRunner``, one set of residuals."""

    def __init__(self, runner, controls: list[Control], conditions: list[torch.Tensor], ids: list[int]):
        masks = [c.mask for c in controls]
        if any(m is not None for m in masks) and not all(m is not None and np.array_equal(m, masks[0]) for m in masks):
            raise ControlstackError("controls of one ControlNet-Union model are fused into one pass, so they share one "
                                    "mask: give them all the same mask (or none)")
        self.runner, self.controls, self.conditions, self.ids = runner, controls, conditions, ids
        self.region = RegionMask(controls[0].mask)  # the shared mask, applied to the fused residuals
        self.last: Residuals | None = None  # the last output (models.tiers.Reuse); one condition: unscaled
        self._scales: list[float] | None = None  # the scales ``last`` was fused with (several conditions)

    def active(self, step: Step) -> bool:
        return any(in_window(c.start, c.end, step) for c in self.controls)

    def __call__(self, x, t, encoder_hidden_states, step: Step, cond_only: bool = False, reuse: bool = False,
                 added: dict | None = None) -> Residuals:
        scales = [weight_at(c.weight, step.progress) * float(in_window(c.start, c.end, step)) for c in self.controls]
        single = len(self.controls) == 1
        # several conditions are scaled inside the fusion: their residuals are reused only at the same scales
        if not (reuse and self.last is not None and (single or scales == self._scales)):
            kw = {"added_cond_kwargs": added} if added else {}
            self.last = self.runner(x, t, encoder_hidden_states, self.conditions, self.ids, scales, **kw)
            self._scales = scales
        return self.region(self.last.times(scales[0]) if single else self.last)


class AdapterBranch:
    """A T2I-Adapter inside one run (``models/adapter.py``): its feature maps, computed once, added
    inside the U-Net's encoder at the steps of its window, times its weight (diffusers'
    ``adapter_conditioning_scale``; its ``adapter_conditioning_factor`` f is the window end=f)."""

    point = "intrablock"  # where the denoiser adds it: inside the encoder, not to the skips

    def __init__(self, features: list[torch.Tensor], weight, start: float, end: float):
        self.features, self.weight, self.start, self.end = features, weight, start, end
        self.last = None

    def active(self, step: Step) -> bool:
        return in_window(self.start, self.end, step)

    def intrablock(self, step: Step) -> list[torch.Tensor]:
        w = weight_at(self.weight, step.progress)
        return [f * w for f in self.features]

