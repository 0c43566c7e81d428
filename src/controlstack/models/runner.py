"""Runners that split diffusers' U-Net and ControlNet forward passes at the injection point.

ControlNet (Zhang et al., ICCV 2023, Sec. 3.1-3.2): ``y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2)``.
The locked U-Net computes its own skip features ``h`` (the outputs of conv_in and of every encoder
layer) and its middle feature; the ControlNet, a trainable copy of that encoder, returns one
zero-convolved residual per skip plus one for the middle. diffusers fuses "add the residuals" into
``UNet2DConditionModel.forward``; here the forward is split into

* :meth:`UNetRunner.encode`  -- time embedding, conv_in, down blocks, mid block -> ``h, mid, ctx``
* :meth:`UNetRunner.decode`  -- ``h + adds``, ``mid + add_mid`` -> up blocks -> ε

so that an injection strategy (``controlstack.injection``) can look at ``h`` before deciding
what to add (Minimal Impact ControlNet needs it). Both halves follow diffusers 0.42's
``UNet2DConditionModel.forward`` line for line (minus adapters / GLIGEN), so outputs are
bit-identical to calling the model with ``down_block_additional_residuals``.

:class:`ControlNetRunner` does the same for ``ControlNetModel.forward`` but splits out the hint
encoder (``controlnet_cond_embedding``): the hint's features do not depend on the timestep, so
they are computed once per run (:meth:`embed_hint`) instead of once per step. Residuals come back
unscaled: weights, schedules, masks and layer weights are the injection strategy's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from controlstack.residuals import Residuals


@dataclass
class UNetContext:
    """What ``decode`` needs from ``encode`` besides the features themselves."""

    emb: torch.Tensor                      # time (+ class / aug) embedding, after time_embed_act
    encoder_hidden_states: torch.Tensor    # text embedding (after the U-Net's own projection)
    forward_upsample_size: bool            # latent size not divisible by the total upsampling
    attention_mask: torch.Tensor | None
    encoder_attention_mask: torch.Tensor | None
    cross_attention_kwargs: dict | None


def _run_down_blocks(blocks, sample, emb, ctx_states, attention_mask, cross_attention_kwargs,
                     encoder_attention_mask, intrablock=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """conv_in's output through the encoder: returns the last sample and every skip feature.
    ``intrablock``: a T2I-Adapter's feature maps, one per block from the first, added as diffusers'
    ``down_intrablock_additional_residuals`` are (inside a cross-attention block before its
    downsampler; after any other block, in place, so its last skip carries it too)."""
    feats = [sample]
    extra = list(intrablock or [])
    for block in blocks:
        if getattr(block, "has_cross_attention", False):
            more = {"additional_residuals": extra.pop(0)} if extra else {}
            sample, res = block(
                hidden_states=sample,
                temb=emb,
                encoder_hidden_states=ctx_states,
                attention_mask=attention_mask,
                cross_attention_kwargs=cross_attention_kwargs,
                encoder_attention_mask=encoder_attention_mask,
                **more,
            )
        else:
            sample, res = block(hidden_states=sample, temb=emb)
            if extra:
                sample += extra.pop(0)
        feats.extend(res)
    return sample, feats


def _run_block(block, sample, emb, ctx_states, attention_mask, cross_attention_kwargs, encoder_attention_mask):
    """A mid block, with or without cross-attention (diffusers' dispatch)."""
    if getattr(block, "has_cross_attention", False):
        return block(
            sample,
            emb,
            encoder_hidden_states=ctx_states,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=encoder_attention_mask,
        )
    return block(sample, emb)


class UNetRunner:
    """``UNet2DConditionModel.forward`` split into :meth:`encode` and :meth:`decode`."""

    def __init__(self, unet):
        self.unet = unet
        cfg = unet.config
        if cfg.addition_embed_type == "image_hint":
            raise NotImplementedError("U-Nets with addition_embed_type='image_hint' are not supported")

    def time_embed(self, sample, timestep, encoder_hidden_states, *, class_labels=None, timestep_cond=None,
                   added_cond_kwargs: dict | None = None) -> torch.Tensor:
        """The embedding every resnet reads: time (+ class / added conditions), after time_embed_act.
        Also what the decoder needs at a step whose encoder features are reused (``models.tiers.Reuse``)."""
        unet = self.unet
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, timestep_cond)
        class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug_emb = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb

    def encode(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        *,
        class_labels=None,
        timestep_cond=None,
        added_cond_kwargs: dict | None = None,
        attention_mask=None,
        encoder_attention_mask=None,
        cross_attention_kwargs: dict | None = None,
        intrablock: list[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, UNetContext]:
        unet = self.unet
        up_factor = 2**unet.num_upsamplers
        forward_upsample_size = any(d % up_factor != 0 for d in sample.shape[-2:])
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0

        emb = self.time_embed(sample, timestep, encoder_hidden_states, class_labels=class_labels,
                              timestep_cond=timestep_cond, added_cond_kwargs=added_cond_kwargs)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )

        sample, h = _run_down_blocks(
            unet.down_blocks, unet.conv_in(sample), emb, encoder_hidden_states,
            attention_mask, cross_attention_kwargs, encoder_attention_mask, intrablock,
        )
        if unet.mid_block is not None:
            sample = _run_block(
                unet.mid_block, sample, emb, encoder_hidden_states,
                attention_mask, cross_attention_kwargs, encoder_attention_mask,
            )
        ctx = UNetContext(
            emb, encoder_hidden_states, forward_upsample_size,
            attention_mask, encoder_attention_mask, cross_attention_kwargs,
        )
        return h, sample, ctx

    def decode(
        self, h: list[torch.Tensor], mid: torch.Tensor, ctx: UNetContext, adds: Residuals | None = None
    ) -> torch.Tensor:
        """Up blocks over ``h + adds.downs`` starting from ``mid + adds.mid``; returns ε."""
        unet = self.unet
        if adds is not None:
            h = [a + b for a, b in zip(h, adds.downs)]
            mid = mid + adds.mid
        sample = mid
        res_all = tuple(h)
        upsample_size = None
        for i, block in enumerate(unet.up_blocks):
            is_final = i == len(unet.up_blocks) - 1
            n = len(block.resnets)
            res, res_all = res_all[-n:], res_all[:-n]
            if not is_final and ctx.forward_upsample_size:
                upsample_size = res_all[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    hidden_states=sample,
                    temb=ctx.emb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=ctx.encoder_hidden_states,
                    cross_attention_kwargs=ctx.cross_attention_kwargs,
                    upsample_size=upsample_size,
                    attention_mask=ctx.attention_mask,
                    encoder_attention_mask=ctx.encoder_attention_mask,
                )
            else:
                sample = block(hidden_states=sample, temb=ctx.emb, res_hidden_states_tuple=res,
                               upsample_size=upsample_size)
        if unet.conv_norm_out:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)

    def __call__(self, sample, timestep, encoder_hidden_states, adds: Residuals | None = None, **kw):
        h, mid, ctx = self.encode(sample, timestep, encoder_hidden_states, **kw)
        return self.decode(h, mid, ctx, adds)


class ControlNetRunner:
    """``ControlNetModel.forward`` with the hint encoder split out and no output scaling."""

    def __init__(self, controlnet):
        self.controlnet = controlnet

    @property
    def dtype(self) -> torch.dtype:
        return self.controlnet.dtype

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """Hint image (B, C, H, W) in [0, 1] -> features at latent size (the zero-conv'd c_f)."""
        if self.controlnet.config.controlnet_conditioning_channel_order == "bgr":
            hint = torch.flip(hint, dims=[1])
        return self.controlnet.controlnet_cond_embedding(hint)

    def __call__(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        hint_features: torch.Tensor,
        *,
        class_labels=None,
        timestep_cond=None,
        added_cond_kwargs: dict | None = None,
        attention_mask=None,
        cross_attention_kwargs: dict | None = None,
    ) -> Residuals:
        cn = self.controlnet
        if hasattr(cn, "residuals"):  # ControlNet-lite (models/lite.py): convolutions only, no time or text
            return cn.residuals(sample, hint_features)
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        emb = self.embedding(sample, timestep, encoder_hidden_states, class_labels, timestep_cond, added_cond_kwargs)
        sample = cn.conv_in(sample)
        if hint_features.shape[0] != sample.shape[0]:  # one hint for the whole batch / CFG halves
            hint_features = hint_features.expand(sample.shape[0], -1, -1, -1)
        return self.encoder(sample + hint_features, emb, encoder_hidden_states, attention_mask, cross_attention_kwargs)

    def embedding(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                  added_cond_kwargs=None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The time (+ class, + added) embedding; ``extra`` (ControlNet-Union's control-type
        embedding) is added before the added conditions, in diffusers' order."""
        cn = self.controlnet
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif len(timesteps.shape) == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(sample.shape[0])
        t_emb = cn.time_proj(timesteps).to(dtype=sample.dtype)
        emb = cn.time_embedding(t_emb, timestep_cond)
        if cn.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when num_class_embeds > 0")
            if cn.config.class_embed_type == "timestep":
                class_labels = cn.time_proj(class_labels)
            emb = emb + cn.class_embedding(class_labels).to(dtype=cn.dtype)
        aug_emb = self._aug_embed(encoder_hidden_states, added_cond_kwargs)
        emb = emb + extra if extra is not None else emb
        return emb + aug_emb if aug_emb is not None else emb

    def encoder(self, sample, emb, encoder_hidden_states, attention_mask=None, cross_attention_kwargs=None) -> Residuals:
        """conv_in's output (plus the hint's features) through the trainable copy and the zero convolutions."""
        cn = self.controlnet
        sample, feats = _run_down_blocks(
            cn.down_blocks, sample, emb, encoder_hidden_states, attention_mask, cross_attention_kwargs, None
        )
        if cn.mid_block is not None:
            sample = _run_block(cn.mid_block, sample, emb, encoder_hidden_states,
                                attention_mask, cross_attention_kwargs, None)
        downs = [zero(f) for f, zero in zip(feats, cn.controlnet_down_blocks)]
        mid = cn.controlnet_mid_block(sample)
        if cn.config.global_pool_conditions:  # ControlNet 1.1 shuffle: global, not spatial, control
            downs = [torch.mean(d, dim=(2, 3), keepdim=True) for d in downs]
            mid = torch.mean(mid, dim=(2, 3), keepdim=True)
        return Residuals(downs, mid)

    def _aug_embed(self, encoder_hidden_states, added_cond_kwargs):
        cn = self.controlnet
        kind = cn.config.addition_embed_type
        if kind is None:
            return None
        if kind == "text":
            return cn.add_embedding(encoder_hidden_states)
        if kind == "text_time":
            text_embeds = added_cond_kwargs["text_embeds"]
            time_ids = added_cond_kwargs["time_ids"]
            time_embeds = cn.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
            return cn.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(cn.dtype))  # diffusers: emb.dtype
        raise NotImplementedError(f"ControlNet addition_embed_type={kind!r} is not supported")
