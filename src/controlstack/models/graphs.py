"""The functions the ``compiled`` and ``fast`` tiers compile: ``fn(module, *tensors) -> tuple``.

Each is a tensors-in, tuple-out view of a runner (:mod:`controlstack.models.runner`) that
``torch.export`` can trace: the U-Net's two halves, one ControlNet, the VAE decoder. ``pool > 1``
is the fast tier's token downsampling (:mod:`controlstack.models.token_downsampling`), applied
around the same call. :mod:`controlstack.models.compiled` digests this module's source into its
cache key (a change here changes the packages), and :mod:`controlstack.models.tiers` builds its
compiled runners from these functions.
"""

from __future__ import annotations

from controlstack.models.runner import ControlNetRunner, UNetContext, UNetRunner
from controlstack.models.token_downsampling import downsampled


def added_kw(added: tuple) -> dict:
    """SDXL's added conditions, graph inputs ``(pooled text, time ids)``, as the runners take them."""
    return {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}


def encode_graph(unet, sample, timestep, text, *added, pool=1):
    """The U-Net's encoder: ``(*h, mid, time embedding, text embedding)``."""
    with downsampled(unet, sample.shape[-2:], pool):
        h, mid, ctx = UNetRunner(unet).encode(sample, timestep, text, **added_kw(added))
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
