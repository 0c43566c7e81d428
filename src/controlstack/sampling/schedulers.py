"""Scheduler names users know (sd-webui / ComfyUI) -> diffusers scheduler classes.

Every scheduler is built ``from_config`` of the base model's own scheduler config, exactly as one
swaps schedulers on a diffusers pipeline (``pipe.scheduler = X.from_config(pipe.scheduler.config)``),
so a model trained with another noise schedule samples correctly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlstack.errors import ControlstackError

# Stable Diffusion 1.x's training schedule (the scheduler_config.json of SD-1.5).
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

@dataclass(frozen=True)
class Sampler:
    """One sampler: our name, the diffusers class and config overrides, sd-webui's label."""

    name: str
    cls: str
    overrides: dict = field(hash=False)
    webui: str
    flow_cls: str | None = None  # its class on a flow-matching base (SD3, Flux); None: not available there


#: THE sampler table; every other view (SCHEDULERS, io.png.SAMPLERS, the server's label -> name)
#: derives from it.
SAMPLER_TABLE: tuple[Sampler, ...] = (
    Sampler("ddim", "DDIMScheduler", {}, "DDIM"),
    Sampler("euler", "EulerDiscreteScheduler", {}, "Euler", "FlowMatchEulerDiscreteScheduler"),
    Sampler("euler_a", "EulerAncestralDiscreteScheduler", {}, "Euler a"),
    Sampler(
        "dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"
    ),
    Sampler(
        "dpmpp_2m_karras",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    Sampler("unipc", "UniPCMultistepScheduler", {}, "UniPC"),
    Sampler("pndm", "PNDMScheduler", {}, "PLMS"),
    Sampler("lms", "LMSDiscreteScheduler", {}, "LMS"),
    # few-step samplers for consistency-distilled models (an LCM-LoRA on the base, an LCM / TCD student)
    Sampler("lcm", "LCMScheduler", {}, "LCM"),
    Sampler("tcd", "TCDScheduler", {}, "TCD"),
)

# name -> (diffusers class name, extra config overrides)
SCHEDULERS: dict[str, tuple[str, dict]] = {s.name: (s.cls, s.overrides) for s in SAMPLER_TABLE}
#: name -> sd-webui's label (infotext's "Sampler:", /sdapi/v1/samplers) and its inverse
WEBUI_SAMPLER_LABELS: dict[str, str] = {s.name: s.webui for s in SAMPLER_TABLE}
SAMPLER_BY_LABEL: dict[str, str] = {s.webui: s.name for s in SAMPLER_TABLE}


#: name -> its class on a flow-matching base, for the samplers that have one
FLOW_SCHEDULERS: dict[str, str] = {s.name: s.flow_cls for s in SAMPLER_TABLE if s.flow_cls}


def make_scheduler(name: str, base_config: dict | None = None, flow: bool = False):
    """A fresh diffusers scheduler named ``name``, configured from ``base_config``; ``flow``: for a
    flow-matching base (its config holds the shift), where ``name`` picks the flow variant."""
    if name not in SCHEDULERS:
        raise ControlstackError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    import diffusers  # local: heavy, only this path needs it

    if flow:
        if name not in FLOW_SCHEDULERS:
            raise ControlstackError(f"scheduler '{name}' samples noise-prediction bases; this flow-matching base "
                                    f"samples with {', '.join(FLOW_SCHEDULERS)}")
        return getattr(diffusers, FLOW_SCHEDULERS[name]).from_config(dict(base_config or {}))

    cls_name, overrides = SCHEDULERS[name]
    config = dict(SD_SCHEDULER_CONFIG if base_config is None else base_config)
    # DDIM/DDPM default to clip_sample=True (clamp the predicted z_0 to [-1, 1]), a pixel-space
    # setting: latents are not bounded by 1 (the bundle's reach 1.6 in a channel's mean), and
    # clamping them washes every sample out. SD's own config says false; a config that does not
    # say (e.g. one written by PNDMScheduler, which has no such key) gets SD's value.
    config.setdefault("clip_sample", False)
    config.update(overrides)
    return getattr(diffusers, cls_name).from_config(config)
