"""Asym and NAsym of a (base, ControlNet) pair: the asymmetry of the part of the noise-prediction
Jacobian that the ControlNet adds (MIControlNet Sec. 5.2.1 "Asymmetry in the Jacobian matrix",
Table 6; Chao et al. 2022). The estimator and the exact meaning of "the part the ControlNet adds"
are in ``training/conservativity.py``; this module averages it over batches of noisy latents.

Per step: ``batch`` rows (default: held-out world scenes, seeds ``[HELD_OUT_SEED, i]``, never
trained on) are encoded by the base's VAE (posterior sample), noised at uniform timesteps, and one
Rademacher probe per sample gives ``tr(J_cn J_cnᵀ)`` and ``tr(J_cn J_cn)`` (sums over the latent's
dimensions). Reported: ``Asym = mean(tr(JJᵀ) − tr(JJ))`` and
``NAsym = ½ mean(tr(JJᵀ) − tr(JJ)) / mean(tr(JJᵀ))`` (ratio of the means: the per-sample ratio is
unstable where tr(JJᵀ) is small, at low noise).

The paper measures batch 64 x 100 steps on SD-1.5 latents. The defaults here (batch 16 x 16
steps, 256 probes) take about 40 s with the bundled model at one thread of a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from controlstack.annotators import controlnet_condition
from controlstack.errors import ControlstackError, require
from controlstack.evaluation import ASYM_BATCH, ASYM_STEPS
from controlstack.injection import make_injection
from controlstack.io.settings import recommended_mode
from controlstack.training.conservativity import epsilon_part, hutchinson_traces, rademacher
from controlstack.training.diffusion import add_noise, encode_latents, sd_noise_scheduler, tokenize

DEFAULT_BATCH, DEFAULT_STEPS = ASYM_BATCH, ASYM_STEPS


@dataclass
class AsymResult:
    asym: float      # mean of tr(JJᵀ) − tr(JJ) = ½ ||J − Jᵀ||²_F per sample
    nasym: float     # ½ mean(tr(JJᵀ) − tr(JJ)) / mean(tr(JJᵀ))
    trace_jjt: float
    samples: int

    def line(self) -> str:
        return f"Asym={self.asym:.6g} NAsym={self.nasym:.6g}"


def condition_of(name: str, folder=None) -> str:
    """The condition column a ControlNet reads (:func:`controlstack.annotators.controlnet_condition`:
    its folder's training record, else a word of its name such as ``mi-canny``'s)."""
    condition = controlnet_condition(name, folder)
    if condition is None:
        raise ControlstackError(f"cannot tell which condition ControlNet '{name}' reads; pass --condition (e.g. canny)")
    return condition


def held_out_rows(n: int, start: int, size: int, condition: str) -> list[dict]:
    """Rows {image, text, hint} of held-out world scenes ``start .. start + n``."""
    from controlstack.world import (  # local: heavy, only this path needs it
        HELD_OUT_SEED,
        WorldConfig,
        render,
        sample_scene,
    )

    rows = []
    for i in range(start, start + n):
        r = render(sample_scene([HELD_OUT_SEED, i], WorldConfig(size=size)), size)
        if condition not in r:
            raise ControlstackError(f"the world has no '{condition}' condition; pass --data with that column")
        rows.append({"image": r["image"], "text": r["text"], "hint": r[condition]})
    return rows


def dataset_rows(path: str, condition: str, n: int, start: int) -> list[dict]:
    from controlstack.training.data import load_image_dataset  # local: heavy, only this path needs it

    ds = load_image_dataset(path, {"image": "image", "text": "text", condition: "hint"})
    require(len(ds) >= n, f"dataset '{path}' has {len(ds)} rows; asym needs batch x steps = {n}; lower them")
    return [ds[(start + i) % len(ds)] for i in range(n)]


def _to_tensor(images, size: int, signed: bool) -> torch.Tensor:
    """PIL images or arrays (``io/images.validate_image``) -> the recipes' tensors."""
    from controlstack.io.images import validate_image  # local: heavy, only this path needs it
    from controlstack.training.data import image_to_tensor  # local: heavy, only this path needs it

    return torch.stack([image_to_tensor(validate_image(im), size, signed) for im in images])


def measure_asym(pipe, controlnet, condition: str | None = None, data: str | None = None,
                 batch: int = DEFAULT_BATCH, steps: int = DEFAULT_STEPS, seed: int = 0,
                 mode: str | None = None, mode_options: dict | None = None, progress: bool = True) -> AsymResult:
    """Asym / NAsym of ``pipe``'s base with ``controlnet`` (a bundled name, a path or a model).

    ``mode``: the injection the ControlNet is used with (default: its folder's recommended mode,
    else ``sum``); Minimal Impact ControlNets are measured in ``mi``, as they were trained."""
    from controlstack.training.controlnet import controlnet_eps  # local: heavy, only this path needs it

    require(isinstance(batch, int) and batch >= 1, f"--batch must be a positive integer, got {batch}")
    require(isinstance(steps, int) and steps >= 1, f"--steps must be a positive integer, got {steps}")
    name = controlnet if isinstance(controlnet, str) else "model"
    model = pipe.controlnet(controlnet)
    folder = pipe.folder_of(controlnet)
    condition = condition or condition_of(str(name), folder)
    if mode is None:
        rec = recommended_mode(folder) if folder is not None else None
        mode, mode_options = rec if rec else ("sum", {})
    injection = make_injection(mode, **(mode_options or {}))
    size = pipe.native_size
    n = batch * steps
    rows = dataset_rows(data, condition, n, 0) if data else held_out_rows(n, 0, size, condition)
    scheduler = sd_noise_scheduler((pipe.scheduler_config or {}).get("prediction_type", "epsilon"))
    generator = torch.Generator().manual_seed(int(seed))
    jjt, jj = [], []
    for s in tqdm(range(steps), desc="asym", unit="batch", disable=not progress):
        chunk = rows[s * batch:(s + 1) * batch]
        images = _to_tensor([r["image"] for r in chunk], size, signed=True)
        hints = _to_tensor([r["hint"] for r in chunk], size, signed=False).to(model.dtype)
        with torch.no_grad():
            noisy, _, t = add_noise(scheduler, encode_latents(pipe.vae, images, generator), generator)
            emb = pipe.text_encoder(tokenize(pipe.tokenizer, [str(r["text"]) for r in chunk], "cpu"))[0]
        x = noisy.to(pipe.unet.dtype).requires_grad_(True)
        with torch.enable_grad():
            out = controlnet_eps(pipe.unet, model, x.detach(), t, emb, hints, injection, control_input=x)
            tr = hutchinson_traces(epsilon_part(out.float(), t, scheduler), x, rademacher(out.float(), generator),
                                   create_graph=False)
        jjt.append(tr.jjt.detach())
        jj.append(tr.jj.detach())
    jjt_all, jj_all = torch.cat(jjt).double(), torch.cat(jj).double()
    asym = float((jjt_all - jj_all).mean())
    denom = float(jjt_all.mean())
    return AsymResult(asym, 0.5 * asym / denom if denom > 0 else float("nan"), denom, int(jjt_all.numel()))

