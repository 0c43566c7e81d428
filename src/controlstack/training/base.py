"""Recipe: train the base text-to-image model ("the pretrained Stable Diffusion" of this project).

Latent diffusion (Rombach et al., CVPR 2022) in Stable Diffusion 1.x's layout: a
``UNet2DConditionModel`` whose encoder levels are ``DownBlock2D`` at high resolution and
``CrossAttnDownBlock2D`` only at the lowest ``attention_levels`` (self-attention cost grows with
the square of the token count; at 16x16 latents the 8x8 and 4x4 levels carry it), conditioned on
a ``CLIPTextModel`` trained jointly from scratch with the world's tokenizer (``tokenizer.py``).
The VAE (``vae.py``) is frozen.

Loss: ``E ||ε - ε_θ(z_t, t, τ(y))||²`` with SD's DDPM schedule (``diffusion.py``); ~10% of
captions are replaced by "" so classifier-free guidance works at sampling time.

Output: ``<output_dir>/model`` is a diffusers Stable Diffusion folder (model_index.json, unet/,
vae/, text_encoder/, tokenizer/, scheduler/) that ``StableDiffusionPipeline.from_pretrained``
loads; it is the ``base`` of the ControlNet recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from controlstack.errors import ControlstackError, require
from controlstack.io.checkpoints import load_base
from controlstack.io.png import make_grid
from controlstack.training.config import TrainConfig, list_field
from controlstack.training.data import (
    RowTransform,
    batch_objects,
    batches,
    first_rows,
    load_image_dataset,
    make_dataloader,
    object_columns,
    object_hints,
    weighted_mean,
)
from controlstack.training.diffusion import (
    PREDICTION_TYPES,
    noisy_batch,
    sd_noise_scheduler,
    sd_sampling_scheduler,
)
from controlstack.training.latents import training_rows
from controlstack.training.session import TrainingSession, make_lr_scheduler, make_optimizer
from controlstack.training.tokenizer import VOCABULARY_SOURCES, build_tokenizer
from controlstack.training.validation import sample_text_to_image, tensor_to_pil


@dataclass
class BaseConfig(TrainConfig):
    vae: str = ""                          # the VAE recipe's output (a save_pretrained folder)
    latent_cache: str = ""                 # file of the VAE's posterior per row (latents.py); "": encode every step
    prediction_type: str = "epsilon"       # epsilon (SD-1.x) | v_prediction (SD-2.x; see diffusion.py)
    init_from: str = ""                    # fine-tune this base folder's U-Net + text encoder + tokenizer
    vocabulary: str = "world"              # world | dataset | bytes (see tokenizer.py)
    max_length: int = 32                   # tokens per caption (whole-word tokens keep captions short)
    # U-Net, SD-1.x layout
    block_out_channels: tuple[int, ...] = list_field(64, 128, 192)
    layers_per_block: int = 2
    attention_levels: int = 2              # cross-attention blocks only at the lowest N levels
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    # CLIP text encoder, trained jointly
    text_hidden_size: int = 128
    text_layers: int = 4
    text_heads: int = 4
    caption_dropout: float = 0.1
    # validation sampling
    validation_prompts: tuple[str, ...] = list_field()   # empty: captions of the validation rows
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    output_dir: str = "outputs/train/base"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.vae != "", "config key 'vae' is missing; set it to the VAE recipe's output folder (.../model)")
        require(self.prediction_type in PREDICTION_TYPES,
                f"config key 'prediction_type' is '{self.prediction_type}'; choose one of {', '.join(PREDICTION_TYPES)}")
        require(not self.init_from or (Path(self.init_from) / "unet" / "config.json").is_file(),
                f"config key 'init_from': no base model (unet/config.json) in '{self.init_from}'")
        require(self.vocabulary in VOCABULARY_SOURCES,
                f"config key 'vocabulary' is '{self.vocabulary}'; choose one of {', '.join(VOCABULARY_SOURCES)}")
        n = len(self.block_out_channels)
        require(n >= 2, "config key 'block_out_channels' needs at least 2 levels")
        require(1 <= self.attention_levels <= n,
                f"config key 'attention_levels' must be in 1..{n} (the number of U-Net levels)")
        require(all(c > 0 and c % self.norm_num_groups == 0 for c in self.block_out_channels),
                f"config key 'block_out_channels' entries must be multiples of norm_num_groups={self.norm_num_groups}")
        require(all(c % self.attention_head_dim == 0 for c in self.block_out_channels),
                "config key 'attention_head_dim' must divide every block_out_channels entry")
        require(self.text_hidden_size % self.text_heads == 0,
                "config key 'text_heads' must divide text_hidden_size")
        require(self.max_length >= 3, "config key 'max_length' must be >= 3 (start, one token, end)")
        require(0.0 <= self.caption_dropout <= 1.0, "config key 'caption_dropout' must be in [0, 1]")
        require(self.layers_per_block >= 1 and self.text_layers >= 1 and self.num_inference_steps >= 1,
                "config keys 'layers_per_block' / 'text_layers' / 'num_inference_steps' must be >= 1")


def build_unet(config: BaseConfig, latent_size: int, latent_channels: int):
    from diffusers import UNet2DConditionModel  # local: heavy, only this path needs it

    n, a = len(config.block_out_channels), config.attention_levels
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * (n - a) + ("CrossAttnDownBlock2D",) * a,
        up_block_types=("CrossAttnUpBlock2D",) * a + ("UpBlock2D",) * (n - a),
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
    )


def build_text_encoder(config: BaseConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel  # local: heavy, only this path needs it

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=4 * config.text_hidden_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        projection_dim=config.text_hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def load_vae(path: str):
    from diffusers import AutoencoderKL  # local: heavy, only this path needs it

    if not (Path(path) / "config.json").is_file():
        raise ControlstackError(f"no VAE at '{path}'; train one with `controlstack train vae` and point 'vae' at its model/")
    vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval()  # the bundle stores fp16
    vae.requires_grad_(False)
    return vae


class TextToImage(torch.nn.Module):
    """U-Net + text encoder: the trainable part, one module so DDP sees the whole forward."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        text = self.text_encoder(input_ids)[0]
        return self.unet(noisy, t, text).sample


def train(config: BaseConfig, resume: bool = False):
    """Train and export the base model; returns the path of the Stable Diffusion folder."""
    session = TrainingSession(config, "base", resume)
    acc = session.accelerator

    columns = {config.image_column: "image", config.caption_column: "text", **object_columns(config)}
    dataset = load_image_dataset(config.data, columns)
    val_set = load_image_dataset(config.validation_data, columns) if config.validation_data else dataset
    vae = load_vae(config.vae).to(acc.device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    require(config.resolution % factor == 0,
            f"config key 'resolution' must be a multiple of the VAE's downsampling ({factor})")
    if config.init_from:  # e.g. the bundle's ε-base, fine-tuned to v-prediction

        start = load_base(config.init_from)
        require(start.unet.config.in_channels == vae.config.latent_channels,
                f"config key 'init_from': its U-Net takes {start.unet.config.in_channels} latent channels, "
                f"the VAE makes {vae.config.latent_channels}")
        tokenizer, model = start.tokenizer, TextToImage(start.unet, start.text_encoder)
        model.requires_grad_(True)
    else:
        tokenizer = build_tokenizer(config.vocabulary, config.max_length, dataset["text"])
        model = TextToImage(
            build_unet(config, config.resolution // factor, vae.config.latent_channels),
            build_text_encoder(config, tokenizer),
        )
    model.train()
    noise_scheduler = sd_noise_scheduler(config.prediction_type)

    cache, dataset, transform = training_rows(config.latent_cache, acc, vae, dataset, config.resolution,
                                              hints=object_hints(config))
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
        noisy, target, t, ids = noisy_batch(vae, noise_scheduler, tokenizer, batch, config.caption_dropout,
                                            session.step_generator(), acc.device, cache)
        objects = batch_objects(batch, config)
        with acc.accumulate(model), acc.autocast():
            loss = weighted_mean((model(noisy, t, ids).float() - target.float()).pow(2), objects, config.object_weight)
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
    return session.export(lambda d: export_pipeline(d, vae, net.text_encoder, tokenizer, net.unet,
                                                    config.prediction_type))


def export_pipeline(folder: Path, vae, text_encoder, tokenizer, unet, prediction_type: str = "epsilon") -> None:
    """A diffusers Stable Diffusion folder (safetensors), loadable by ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline  # local: heavy, only this path needs it

    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=sd_sampling_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder, safe_serialization=True)


@torch.no_grad()
def validate(session: TrainingSession, net: TextToImage, vae, tokenizer, prompts: list[str], val: dict) -> None:
    """Prompt samples (row 1) above the real images whose captions they are (row 2)."""
    cfg = session.config
    net.eval()
    images = sample_text_to_image(
        vae, net.text_encoder, tokenizer, net.unet, sd_sampling_scheduler(cfg.prediction_type).config, prompts,
        cfg.resolution, cfg.num_inference_steps, cfg.guidance_scale, cfg.seed,
    )
    rows = [images]
    if not cfg.validation_prompts:
        rows.append(tensor_to_pil(val["image"], True))
    make_grid([im for row in rows for im in row], cols=len(rows[0])).save(session.out / "samples" / f"step-{session.step:07d}.png")
    net.train()
