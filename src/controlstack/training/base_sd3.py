"""Recipe: train a transformer base in Stable Diffusion 3's layout with rectified flow.

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (2024): an
MMDiT (``SD3Transformer2DModel``: text and image tokens in joint attention blocks) over patches of
the frozen VAE's latents, conditioned on two CLIP text encoders -- their penultimate states side by
side, their pooled embeddings as the pooled projection -- and, absent T5, the 256 zero tokens
diffusers' pipelines put in its place (``families/sd3.join_text``, the same function sampling
uses). The two encoders (the "L" and "G" roles, each half the text width) are trained jointly from
scratch with the world's tokenizer, as the U-Net base recipe trains its one encoder.

Loss (Sec. 2-3.1): ``x_t = (1 - t) x_0 + t ε`` with ``t`` logit-normal, the network regresses
``v = ε - x_0`` at timestep ``1000 t``; ~10% of captions are replaced by "" for classifier-free
guidance. Output: ``<output_dir>/model`` is a ``StableDiffusion3Pipeline`` folder (transformer/,
vae/, text_encoder/, text_encoder_2/, tokenizers, a ``FlowMatchEulerDiscreteScheduler`` with
``shift``), the ``base`` of the ControlNet recipe (``controlnet_transformer.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from controlstack.errors import require
from controlstack.io.png import make_grid
from controlstack.models.components import SDComponents
from controlstack.models.families.sd3 import T5_TOKENS, join_text
from controlstack.pipeline import Pipeline
from controlstack.prompting import project_prompts
from controlstack.training.base import load_vae
from controlstack.training.config import TrainConfig, list_field
from controlstack.training.controlnet_transformer import flow_batch
from controlstack.training.data import RowTransform, batches, first_rows, load_image_dataset, make_dataloader
from controlstack.training.diffusion import drop_captions, tokenize
from controlstack.training.latents import batch_latents, training_rows
from controlstack.training.session import TrainingSession, make_lr_scheduler, make_optimizer
from controlstack.training.tokenizer import VOCABULARY_SOURCES, build_tokenizer
from controlstack.training.validation import tensor_to_pil


@dataclass
class SD3BaseConfig(TrainConfig):
    vae: str = ""                      # the VAE recipe's output (a save_pretrained folder)
    latent_cache: str = ""
    vocabulary: str = "world"          # world | dataset | bytes (tokenizer.py)
    max_length: int = 32
    # the MMDiT
    patch_size: int = 2
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    # two CLIP text encoders, trained jointly; their states side by side make the text width
    text_hidden_size: int = 128        # the joint attention width = both encoders' states side by side
    text_layers: int = 3
    text_heads: int = 2
    caption_dropout: float = 0.1
    shift: float = 1.0                 # the sampling schedule's shift (SD3: 3.0 at 1024 px)
    validation_prompts: tuple[str, ...] = list_field()
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    output_dir: str = "outputs/train/base_sd3"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.vae != "", "config key 'vae' is missing; set it to the VAE recipe's output folder (.../model)")
        require(self.vocabulary in VOCABULARY_SOURCES,
                f"config key 'vocabulary' is '{self.vocabulary}'; choose one of {', '.join(VOCABULARY_SOURCES)}")
        require(self.text_hidden_size % 2 == 0 and (self.text_hidden_size // 2) % self.text_heads == 0,
                "config key 'text_hidden_size' must be even, each encoder's half divisible by 'text_heads'")
        require(self.patch_size >= 1 and self.layers >= 1 and self.heads >= 1 and self.head_dim >= 1,
                "config keys 'patch_size' / 'layers' / 'heads' / 'head_dim' must be >= 1")
        require(self.max_length >= 3, "config key 'max_length' must be >= 3 (start, one token, end)")
        require(0.0 <= self.caption_dropout <= 1.0, "config key 'caption_dropout' must be in [0, 1]")
        require(self.shift > 0, "config key 'shift' must be > 0")


def build_transformer(config: SD3BaseConfig, latent_size: int, latent_channels: int):
    from diffusers import SD3Transformer2DModel  # local: heavy, only this path needs it

    require(latent_size % config.patch_size == 0,
            f"config key 'patch_size' ({config.patch_size}) must divide the latent size ({latent_size})")
    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=config.patch_size, in_channels=latent_channels,
        out_channels=latent_channels, num_layers=config.layers, attention_head_dim=config.head_dim,
        num_attention_heads=config.heads, joint_attention_dim=config.text_hidden_size,
        caption_projection_dim=config.heads * config.head_dim, pooled_projection_dim=config.text_hidden_size,
        pos_embed_max_size=latent_size // config.patch_size)


def build_text_encoder(config: SD3BaseConfig, tokenizer):
    """One of the two CLIP encoders (with projection: its pooled embedding), half the text width."""
    from transformers import (  # local: heavy, only this path needs it
        CLIPTextConfig,
        CLIPTextModelWithProjection,
    )

    half = config.text_hidden_size // 2
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=half, intermediate_size=4 * half, num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads, max_position_embeddings=config.max_length, projection_dim=half,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


class SD3TextToImage(torch.nn.Module):
    """Transformer + both text encoders: the trainable part, one module so DDP sees the whole forward."""

    def __init__(self, transformer, text_encoder, text_encoder_2):
        super().__init__()
        self.transformer, self.text_encoder, self.text_encoder_2 = transformer, text_encoder, text_encoder_2

    def forward(self, noisy, t, ids) -> torch.Tensor:
        outs = [enc(ids, output_hidden_states=True) for enc in (self.text_encoder, self.text_encoder_2)]
        zeros = torch.zeros(1, T5_TOKENS, self.transformer.config.joint_attention_dim, device=noisy.device)
        hidden, pooled = join_text([o.hidden_states[-2] for o in outs], [o[0] for o in outs], zeros)
        return self.transformer(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=hidden,
                                pooled_projections=pooled, return_dict=False)[0]


def train(config: SD3BaseConfig, resume: bool = False):
    """Train and export the base; returns the path of its ``StableDiffusion3Pipeline`` folder."""
    session = TrainingSession(config, "base_sd3", resume)
    acc = session.accelerator
    columns = {config.image_column: "image", config.caption_column: "text"}
    dataset = load_image_dataset(config.data, columns)
    val_set = load_image_dataset(config.validation_data, columns) if config.validation_data else dataset
    vae = load_vae(config.vae).to(acc.device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    require(config.resolution % factor == 0,
            f"config key 'resolution' must be a multiple of the VAE's downsampling ({factor})")
    tokenizer = build_tokenizer(config.vocabulary, config.max_length, dataset["text"])
    torch.manual_seed(config.seed)
    model = SD3TextToImage(build_transformer(config, config.resolution // factor, vae.config.latent_channels),
                           build_text_encoder(config, tokenizer), build_text_encoder(config, tokenizer)).train()

    cache, dataset, transform = training_rows(config.latent_cache, acc, vae, dataset, config.resolution)
    loader = make_dataloader(dataset, transform, config.batch_size, config.num_workers)
    val = first_rows(val_set, config.num_validation_images,
                     RowTransform(config.resolution, targets=("image",), caption="text"))
    prompts = list(config.validation_prompts) or list(val["text"])
    optimizer = make_optimizer(model.parameters(), config)
    lr_scheduler = make_lr_scheduler(optimizer, config, acc.num_processes)
    model, optimizer, loader, lr_scheduler = acc.prepare(model, optimizer, loader, lr_scheduler)
    session.restore()

    bar = session.progress()
    for batch in batches(acc, loader, session.micro) if not session.done else ():
        g = session.step_generator()
        with torch.no_grad():
            latents = batch_latents(vae, batch, g, acc.device, cache)
        ids = tokenize(tokenizer, drop_captions(batch["text"], config.caption_dropout, g), acc.device)
        noisy, target, t = flow_batch(latents, g)
        with acc.accumulate(model), acc.autocast():
            loss = F.mse_loss(model(noisy, t, ids).float(), target.float())
            session.optimize(model, loss, optimizer, lr_scheduler)
        if not acc.sync_gradients:
            continue
        session.end_step(bar, lr_scheduler)
        if session.should_validate() and session.is_main:
            validate(session, acc.unwrap_model(model), vae, tokenizer, prompts, val)
        if session.done:
            break
    bar.close()
    net = acc.unwrap_model(model).eval()
    return session.export(lambda d: export_pipeline(d, net, vae, tokenizer, config.shift))


def components(net: SD3TextToImage, vae, tokenizer, shift: float) -> SDComponents:
    return SDComponents(unet=net.transformer, vae=vae, text_encoder=net.text_encoder, tokenizer=tokenizer,
                        text_encoder_2=net.text_encoder_2, tokenizer_2=tokenizer,
                        scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                          "shift": shift})


def export_pipeline(folder, net: SD3TextToImage, vae, tokenizer, shift: float) -> None:
    """A ``StableDiffusion3Pipeline`` folder (safetensors; no T5: its tokens are zeros)."""
    from diffusers import (  # local: heavy, only this path needs it
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3Pipeline,
    )

    StableDiffusion3Pipeline(
        transformer=net.transformer, vae=vae, text_encoder=net.text_encoder, tokenizer=tokenizer,
        text_encoder_2=net.text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
    ).save_pretrained(folder, safe_serialization=True)


@torch.no_grad()
def validate(session: TrainingSession, net: SD3TextToImage, vae, tokenizer, prompts: list[str], val: dict) -> None:
    """Prompt samples through the project's Pipeline (row 1) above the real images (row 2)."""
    cfg = session.config
    net.eval()
    pipe = Pipeline(components(net, vae, tokenizer, cfg.shift))
    with project_prompts():
        images = [pipe(p, steps=cfg.num_inference_steps, cfg=cfg.guidance_scale, seed=cfg.seed + i,
                       width=cfg.resolution, height=cfg.resolution, progress=False)[0] for i, p in enumerate(prompts)]
    rows = [images] + ([tensor_to_pil(val["image"], True)] if not cfg.validation_prompts else [])
    make_grid([im for row in rows for im in row], cols=len(images)).save(
        session.out / "samples" / f"step-{session.step:07d}.png")
    net.train()
