"""Recipe: train the VAE (``diffusers.AutoencoderKL``) of the latent diffusion model.

Latent diffusion (Rombach et al., CVPR 2022, Sec. 3.1): an encoder maps x to a diagonal Gaussian
q(z|x) at 1/f resolution (f = 4 or 8; SD uses 8), a decoder maps z back. Loss = reconstruction
(L1 or MSE) + ``kl_weight`` * KL(q(z|x) || N(0, I)) (the paper's "KL-reg", weight ~1e-6) + an
optional image-gradient L1 term that sharpens edges without a perceptual network (LPIPS weights
cannot be downloaded here). No adversarial term at this scale.

After training the recipe measures the latent scale the way SD chose 0.18215: ``1 / std`` of
posterior samples over the first batches, stored as ``scaling_factor`` in the VAE's config so the
diffusion recipes get unit-variance latents. Output: ``<output_dir>/model`` (save_pretrained,
safetensors + config.json).

Reads top to bottom: config -> model -> loss -> train().
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from controlstack.errors import require
from controlstack.io.png import make_grid
from controlstack.training.base import load_vae
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
from controlstack.training.session import TrainingSession, make_lr_scheduler, make_optimizer
from controlstack.training.validation import tensor_to_pil

RECONSTRUCTION_LOSSES = ("l1", "mse")


@dataclass
class VAEConfig(TrainConfig):
    downsampling: int = 8                              # f: latent side = resolution / f
    block_out_channels: tuple[int, ...] = list_field()  # empty: derived from downsampling
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 16
    reconstruction_loss: str = "l1"
    kl_weight: float = 1e-6
    gradient_loss_weight: float = 0.0                  # L1 between image gradients (edge sharpness)
    crop_size: int = 0                                 # train on random crops of this side; 0: whole images
    init_from: str = ""                                # start from this VAE folder (save_pretrained)
    train_encoder: bool = True                         # false: encoder frozen, q(z|x) and latent caches stay valid
    latent_noise: float = 0.0                          # decoder sees z + σ·std(z)·ε, σ ~ U(0, latent_noise) per image
    scaling_batches: int = 8                           # batches used to measure 1 / std of latents
    learning_rate: float = 2e-4
    output_dir: str = "outputs/train/vae"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.downsampling in (4, 8), f"config key 'downsampling' must be 4 or 8, got {self.downsampling}")
        levels = int(math.log2(self.downsampling)) + 1
        if not self.block_out_channels:
            self.block_out_channels = (32, 64, 64, 64)[:levels] if levels == 4 else (32, 64, 64)
        require(len(self.block_out_channels) == levels,
                f"config key 'block_out_channels' needs {levels} entries for {self.downsampling}x downsampling, "
                f"got {len(self.block_out_channels)}")
        require(all(c % self.norm_num_groups == 0 and c > 0 for c in self.block_out_channels),
                f"config key 'block_out_channels' entries must be multiples of norm_num_groups={self.norm_num_groups}")
        require(self.resolution % self.downsampling == 0,
                f"config key 'resolution' must be a multiple of downsampling={self.downsampling}")
        require(self.reconstruction_loss in RECONSTRUCTION_LOSSES,
                f"config key 'reconstruction_loss' is '{self.reconstruction_loss}'; choose one of l1, mse")
        require(self.kl_weight >= 0 and self.gradient_loss_weight >= 0,
                "config keys 'kl_weight' / 'gradient_loss_weight' must be >= 0")
        require(self.crop_size == 0 or (self.crop_size % self.downsampling == 0 and self.crop_size <= self.resolution),
                f"config key 'crop_size' must be 0 or a multiple of downsampling={self.downsampling} "
                f"no larger than resolution={self.resolution}, got {self.crop_size}")
        require(self.latent_noise >= 0, f"config key 'latent_noise' must be >= 0, got {self.latent_noise}")
        require(self.train_encoder or self.init_from,
                "config key 'train_encoder: false' needs 'init_from' (a trained VAE whose encoder to keep)")
        require(self.latent_channels >= 1 and self.scaling_batches >= 1,
                "config keys 'latent_channels' / 'scaling_batches' must be >= 1")


def build_vae(config: VAEConfig):
    from diffusers import AutoencoderKL  # local: heavy, only this path needs it

    if config.init_from:
        vae = load_vae(config.init_from)  # fp32 copy of e.g. the fp16 bundle
        vae.requires_grad_(True)
        if not config.train_encoder:
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)
        return vae

    n = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.block_out_channels),
        latent_channels=config.latent_channels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.resolution,
    )


def random_crops(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image, offsets drawn from ``generator`` (so a resumed
    run crops exactly as the uninterrupted one). The VAE is convolutional: trained on crops, it
    runs on whole images (SD's VAE was trained at 256 px and is used at 512)."""
    if size <= 0 or size >= x.shape[-1] and size >= x.shape[-2]:
        return x
    ys = torch.randint(0, x.shape[-2] - size + 1, (x.shape[0],), generator=generator).tolist()
    xs = torch.randint(0, x.shape[-1] - size + 1, (x.shape[0],), generator=generator).tolist()
    return torch.stack([im[:, y:y + size, x0:x0 + size] for im, y, x0 in zip(x, ys, xs)])


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class VAELoss(torch.nn.Module):
    """VAE + its loss in one module, so ``accelerator.prepare`` (DDP) sees the whole forward."""

    def __init__(self, vae, config: VAEConfig):
        super().__init__()
        self.vae, self.config = vae, config

    def forward(self, x: torch.Tensor, generator: torch.Generator,
                objects: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """``objects``: (B, 1, H, W) 0/1 map of object pixels, weighted 1 + ``object_weight``."""
        cfg = self.config
        with torch.set_grad_enabled(cfg.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        if cfg.latent_noise > 0:
            # A decoder that only ever saw exact posterior samples (σ_q ~ 1e-3 at kl_weight 1e-6) turns
            # the small errors of a diffusion model's latents into blotches; noisy latents make it smooth.
            sigma = torch.rand(z.shape[0], 1, 1, 1, generator=generator).to(z) * cfg.latent_noise
            z = z + sigma * z.detach().std() * torch.randn(z.shape, generator=generator).to(z)
        rec = self.vae.decode(z).sample.float()
        err = (rec - x).abs() if cfg.reconstruction_loss == "l1" else (rec - x).pow(2)
        rec_loss = weighted_mean(err, objects, cfg.object_weight)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, so kl_weight is resolution-free
        loss = rec_loss + cfg.kl_weight * kl
        if cfg.gradient_loss_weight > 0:
            (gx, gy), (rx, ry) = image_gradients(x), image_gradients(rec)
            loss = loss + cfg.gradient_loss_weight * (F.l1_loss(rx, gx) + F.l1_loss(ry, gy))
        return loss, {"rec": rec_loss.detach(), "kl": kl.detach()}


@torch.no_grad()
def measure_scaling_factor(vae, loader, n_batches: int, device) -> float:
    """1 / std of posterior samples over the first ``n_batches`` (SD's 0.18215 was chosen so)."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        dist = vae.encode(batch["image"].to(device)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=g).to(dist.mean)
        samples.append((dist.mean + dist.std * noise).flatten().float().cpu())
    return float(1.0 / torch.cat(samples).std())


def train(config: VAEConfig, resume: bool = False):
    """Train and export the VAE; returns the path of the exported model folder."""
    session = TrainingSession(config, "vae", resume)
    acc = session.accelerator

    columns = {config.image_column: "image", **object_columns(config)}
    dataset = load_image_dataset(config.data, columns)
    transform = RowTransform(config.resolution, targets=("image",), hints=object_hints(config))
    loader = make_dataloader(dataset, transform, config.batch_size, config.num_workers)
    # validation reconstructs images only: a validation set needs no object column
    image_only = RowTransform(config.resolution, targets=("image",))
    val_set = (load_image_dataset(config.validation_data, {config.image_column: "image"})
               if config.validation_data else dataset)
    val = first_rows(val_set, config.num_validation_images, image_only)

    model = VAELoss(build_vae(config), config).train()
    optimizer = make_optimizer(model.parameters(), config)
    lr_scheduler = make_lr_scheduler(optimizer, config, acc.num_processes)
    model, optimizer, loader, lr_scheduler = acc.prepare(model, optimizer, loader, lr_scheduler)
    session.restore()

    bar = session.progress()
    for batch in batches(acc, loader, session.micro) if not session.done else ():
        generator = session.step_generator()
        images, objects = batch["image"], None
        if config.object_column:  # crop the object map with the image: one crop of both
            images = torch.cat([images, batch_objects(batch, config).to(images)], 1)
        images = random_crops(images, config.crop_size, generator)
        if config.object_column:
            images, objects = images[:, :3], images[:, 3:]
        with acc.accumulate(model), acc.autocast():
            loss, _ = model(images, generator, objects)
            session.optimize(model, loss, optimizer, lr_scheduler)
        if not acc.sync_gradients:
            continue
        session.end_step(bar, lr_scheduler)
        if session.should_validate() and session.is_main:
            validate(session, acc.unwrap_model(model).vae, val)
        if session.done:
            break
    bar.close()

    vae = acc.unwrap_model(model).vae.eval()
    # The latent scale is measured on the data in a fixed order, after the last step.
    ordered = make_dataloader(dataset, image_only, config.batch_size, 0, shuffle=False)
    if config.train_encoder:  # a frozen encoder keeps its latents, hence its measured scale
        scale = measure_scaling_factor(vae, ordered, config.scaling_batches, acc.device)
        vae.register_to_config(scaling_factor=scale)
    scale = float(vae.config.scaling_factor)
    if session.is_main:
        session.metrics.log(session.step, scaling_factor=scale)
    return session.export(lambda d: vae.save_pretrained(d, safe_serialization=True))


@torch.no_grad()
def validate(session: TrainingSession, vae, val: dict) -> None:
    """Grid real | reconstruction (posterior mean) and the PSNR, at the current step."""
    was_training = vae.training
    vae.eval()
    x = val["image"].to(session.device)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = ((rec.float() - x) / 2).pow(2).mean(dim=(1, 2, 3))  # in [0, 1] units
    psnr = float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())
    session.metrics.log(session.step, val_psnr=psnr)
    grid = make_grid([im for pair in zip(tensor_to_pil(x, True), tensor_to_pil(rec, True)) for im in pair], cols=2)
    grid.save(session.out / "samples" / f"step-{session.step:07d}.png")
    vae.train(was_training)
