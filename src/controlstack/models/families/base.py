"""What a family does unless it says otherwise: a U-Net on unpacked latents, DDPM sampling with
classifier-free guidance in a batch of two. ``flux.py`` is the family that overrides every hook."""

from __future__ import annotations


class Family:
    bundled_controlnets = False
    network = "unet"             # the denoiser kind (the pipeline's table): unet | mmdit | flux
    default_scheduler = "unipc"  # the sampler a call without one gets
    flow = False                 # flow matching (velocity on a sigma schedule) rather than DDPM noise prediction
    cfg_batch = True             # classifier-free guidance as a batch of two (uncond, cond)

    def native_size(self, pipe) -> int:
        """The image size the base was trained at: the network's sample size times the VAE factor."""
        return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor

    def noise_shape(self, pipe, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of the starting noise for a ``height`` x ``width`` image."""
        f = pipe.vae_scale_factor
        return batch, pipe.unet.config.out_channels, height // f, width // f

    def pack(self, latents):
        """``(B, C, h, w)`` latents -> what the network reads (as they are, but for Flux's patches)."""
        return latents

    def unpack(self, latents, h: int, w: int):
        return latents

    def set_timesteps(self, scheduler, steps: int, latents, device) -> None:
        scheduler.set_timesteps(steps, device=device)

    def load_lora(self, pipe, state: dict, name: str) -> None:
        """Put a LoRA ``state`` (any layout diffusers' loader for this family reads) into the base's
        denoiser and text encoders as PEFT adapter ``name``."""
        loader = self.lora_loader()
        converted, alphas = loader.lora_state_dict(state, unet_config=pipe.unet.config)
        loader.load_lora_into_unet(converted, alphas, pipe.unet, adapter_name=name)
        for prefix, encoder in self.text_encoders(pipe):
            loader.load_lora_into_text_encoder(converted, alphas, encoder, prefix=prefix, adapter_name=name)

    def drop_lora(self, pipe, name: str) -> None:
        """After LoRA ``name``'s adapter layers are deleted: undo what else it changed in the base."""
