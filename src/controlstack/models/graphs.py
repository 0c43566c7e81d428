"""The functions the ``compiled`` and ``fast`` tiers compile: ``fn(module, *tensors) -> tuple``.

Each is a tensors-in, tuple-out view of a runner (:mod:`controlstack.models.runner`) that
``torch.export`` can trace: the U-Net's two halves, one ControlNet, the VAE decoder. ``pool > 1``
is the fast tier's token downsampling (:mod:`controlstack.models.token_downsampling`), applied
around the same call. :mod:`controlstack.models.compiled` digests this module's source into its
cache key (a change here changes the packages), and :mod:`controlstack.models.tiers` builds its
compiled runners from these functions.
"""

from __future__ import annotations

import torch

from controlstack.models.runner import ControlNetRunner, UNetContext, UNetRunner
from controlstack.models.token_downsampling import downsampled


def added_kw(added: tuple) -> dict:
    """SDXL's added conditions, graph inputs ``(pooled text, time ids)``, as the runners take them."""
    return {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}


def split_extra(unet, extra: tuple) -> tuple[tuple, dict]:
    """The encoder graph's extra inputs: SDXL's added conditions, then a guidance-embedded U-Net's
    (an LCM student's) ``timestep_cond`` -- the model's config says whether it has one."""
    if unet.config.get("time_cond_proj_dim") is not None:
        return extra[:-1], {"timestep_cond": extra[-1]}
    return extra, {}


def encode_graph(unet, sample, timestep, text, *extra, pool=1):
    """The U-Net's encoder: ``(*h, mid, time embedding, text embedding)``."""
    added, cond = split_extra(unet, extra)
    with downsampled(unet, sample.shape[-2:], pool):
        h, mid, ctx = UNetRunner(unet).encode(sample, timestep, text, **added_kw(added), **cond)
    return (*h, mid, ctx.emb, ctx.encoder_hidden_states)


def decode_graph(unet, *tensors, pool=1):
    """The U-Net's decoder over ``encode_graph``'s outputs (with the residuals already added): ``(ε,)``."""
    *h, mid, emb, text = tensors
    up_factor = 2**unet.num_upsamplers
    ctx = UNetContext(emb, text, any(d % up_factor for d in h[0].shape[-2:]), None, None, None)
    with downsampled(unet, h[0].shape[-2:], pool):  # h[0]: conv_in's output, at the latent's size
        return (UNetRunner(unet).decode(list(h), mid, ctx),)


def controlnet_graph(controlnet, sample, timestep, text, features, *added, pool=1):
    """One ControlNet from its cached hint features: ``(*down residuals, mid residual)``, unscaled."""
    with downsampled(controlnet, sample.shape[-2:], pool):
        res = ControlNetRunner(controlnet)(sample, timestep, text, features, **added_kw(added))
    return (*res.downs, res.mid)


def vae_decode_graph(vae, latents):
    """The VAE decoder: ``(image,)``."""
    return (vae.decode(latents, return_dict=False)[0],)


# -- transformer bases: a module called with keyword arguments ----------------------------------------
#: keyword inputs kept in float32 in a bf16 graph: times and positions, embedded sinusoidally / as rotary angles
EXACT_KEYWORDS = ("timestep", "guidance", "img_ids", "txt_ids")


def call_structure(kw: dict) -> tuple[tuple, list]:
    """A keyword call split into its structure and its tensors: each argument, sorted by name, is
    ``(name, "tensor")``, ``(name, "list", n)`` (n tensors), or ``(name, "const", value)`` (None, a
    flag, a number). The structure is what a graph is compiled for; the tensors are its inputs."""
    structure, tensors = [], []
    for name in sorted(kw):
        value = kw[name]
        if isinstance(value, torch.Tensor):
            structure.append((name, "tensor"))
            tensors.append(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            structure.append((name, "list", len(value)))
            tensors.extend(value)
        else:
            structure.append((name, "const", value))
    return tuple(structure), tensors


def exact_positions(structure: tuple) -> tuple[int, ...]:
    """The positions of :data:`EXACT_KEYWORDS` among a structure's tensor inputs."""
    out, i = [], 0
    for item in structure:
        n = 1 if item[1] == "tensor" else item[2] if item[1] == "list" else 0
        if item[0] in EXACT_KEYWORDS:
            out += range(i, i + n)
        i += n
    return tuple(out)


def call_graph(module, *tensors, structure: tuple):
    """``module(**kw, return_dict=False)`` rebuilt from :func:`call_structure`'s tensors, its output
    flattened to a tuple of tensors (None leaves dropped; the caller keeps the output's layout)."""
    kw, i = {}, 0
    for item in structure:
        if item[1] == "tensor":
            kw[item[0]], i = tensors[i], i + 1
        elif item[1] == "list":
            kw[item[0]], i = list(tensors[i:i + item[2]]), i + item[2]
        else:
            kw[item[0]] = item[2]
    out = module(**kw, return_dict=False)
    return tuple(t for t in torch.utils._pytree.tree_leaves(out) if t is not None)
