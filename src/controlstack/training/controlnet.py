"""Recipe: train a ControlNet on the locked base model, as the ControlNet paper does.

Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (ICCV 2023),
Sec. 3: ``y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2)``. The base U-Net ``F(·; Θ)`` is locked;
``ControlNetModel.from_unet`` makes the trainable copy ``Θc`` of its encoder and middle block,
the hint encoder (stride-2 convs down to latent size, ``hint_channels``) and the zero
convolutions ``Z`` (weights and biases 0, so step 0 reproduces the base exactly).
Training (Sec. 3.3-4): ``L = E ||ε - ε_θ(z_t, t, c_t, c_f)||²``, AdamW, 50% of prompts replaced by
"" (the model must learn semantics from the condition), mixed precision, gradient accumulation,
optional EMA of the ControlNet's weights. Hint in [0, 1], target latents from the base's VAE.

The forward pass is the project's own inference path (``models/runner.py`` + ``injection``):
``encode -> ControlNet residuals -> sum injection -> decode`` in :func:`controlnet_eps`.

Output: ``<output_dir>/model`` is a diffusers ``ControlNetModel`` folder (safetensors; the EMA
weights when ``use_ema``). ``metrics.csv`` logs the loss and the condition fidelity of validation
samples; ``fidelity.png`` plots it, where the paper's sudden convergence shows as a jump.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from controlstack.errors import require
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
from controlstack.training.diffusion import noisy_batch, sd_noise_scheduler
from controlstack.training.latents import training_rows
from controlstack.training.session import TrainingSession, make_lr_scheduler, make_optimizer
from controlstack.training.validation import (
    condition_fidelity,
    plot_metric,
    sample_controlnet,
    tensor_to_pil,
)


@dataclass
class ControlNetConfig(TrainConfig):
    base: str = ""                          # the base recipe's output: a Stable Diffusion folder
    condition: str = "canny"                # dataset column holding the hint image
    latent_cache: str = ""                  # file of the VAE's posterior per row (latents.py); "": encode every step
    # fine-tune this trained ControlNet (folder or single file) instead of copying the base's encoder;
    # diffusers' train_controlnet.py --controlnet_model_name_or_path; its own hint encoder is kept, so
    # hint_channels is unused then. "": a fresh copy (zero convs at 0)
    init_from: str = ""
    # hint encoder channels, one per stage: len - 1 stride-2 convs = log2(VAE downsampling) + 1 entries
    hint_channels: tuple[int, ...] = list_field(16, 32, 64, 128)
    caption_dropout: float = 0.5            # the paper: 50% of prompts replaced by ""
    use_ema: bool = False
    ema_decay: float = 0.9999
    learning_rate: float = 1e-5             # the paper's AdamW learning rate
    # validation sampling
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    conditioning_scale: float = 1.0
    output_dir: str = "outputs/train/controlnet"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.base != "", "config key 'base' is missing; set it to the base recipe's output folder (.../model)")
        require(self.condition != "", "config key 'condition' is empty; name the dataset column of the hint (e.g. canny)")
        require(len(self.hint_channels) >= 2 and all(c > 0 for c in self.hint_channels),
                "config key 'hint_channels' needs >= 2 positive entries")
        require(0.0 <= self.caption_dropout <= 1.0, "config key 'caption_dropout' must be in [0, 1]")
        require(self.object_column != self.condition,
                f"config keys 'object_column' and 'condition' both name '{self.condition}'; use two columns")
        require(0.0 < self.ema_decay < 1.0, "config key 'ema_decay' must be in (0, 1)")
        require(self.num_inference_steps >= 1, "config key 'num_inference_steps' must be >= 1")


def load_base(path: str):
    """The locked base (float32, gradients off): any base ``controlstack`` loads -- a diffusers
    folder (e.g. the fp16 bundle) or an SD-1.x single file."""
    from controlstack.io.checkpoints import load_base as load

    base = load(path)
    for module in (base.unet, base.vae, base.text_encoder):
        module.eval().requires_grad_(False)  # locked: F(x; Θ) never changes
    return base


def build_controlnet(unet, vae, hint_channels, init: str = ""):
    """``ControlNetModel.from_unet``; the hint encoder must land exactly at latent resolution.
    With ``init`` (fine-tuning) the trained ControlNet there instead, checked against the base."""
    from diffusers import ControlNetModel

    if init:
        from controlstack.io.checkpoints import check_compatible, load_controlnet

        controlnet = load_controlnet(init)
        check_compatible(controlnet, unet)
        return controlnet.train()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    need = int(math.log2(factor)) + 1
    require(len(hint_channels) == need,
            f"config key 'hint_channels' has {len(hint_channels)} entries ({2 ** (len(hint_channels) - 1)}x "
            f"downsampling) but the base's VAE downsamples {factor}x; give it {need} entries")
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(hint_channels))


def controlnet_eps(unet, controlnet, noisy, t, text_emb, hint) -> torch.Tensor:
    """ε through the project's inference path: U-Net encode, ControlNet residuals, sum, decode."""
    from controlstack.injection import make_injection
    from controlstack.models.runner import ControlNetRunner, UNetRunner

    unet_r, cn_r = UNetRunner(unet), ControlNetRunner(controlnet)
    hint_features = cn_r.embed_hint(hint)
    h, mid, ctx = unet_r.encode(noisy, t, text_emb)
    residuals = cn_r(noisy, t, text_emb, hint_features)
    adds = make_injection("sum")(h, mid, [residuals])
    return unet_r.decode(h, mid, ctx, adds)


class ControlledUNet(torch.nn.Module):
    """Locked U-Net + trainable ControlNet, one module so DDP sees the whole forward."""

    def __init__(self, unet, controlnet):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, noisy, t, text_emb, hint) -> torch.Tensor:
        return controlnet_eps(self.unet, self.controlnet, noisy, t, text_emb, hint)


def assert_locked(model: ControlledUNet, optimizer, *frozen) -> None:
    """The paper's contract: nothing of the base trains, every ControlNet weight does."""
    for module in (model.unet, *frozen):
        assert not any(p.requires_grad for p in module.parameters()), "a base-model weight requires grad"
    trainable = {id(p) for p in model.controlnet.parameters()}
    assert all(p.requires_grad for p in model.controlnet.parameters()), "a ControlNet weight is frozen"
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == trainable, "the optimiser must hold exactly the ControlNet's parameters"


def train(config: ControlNetConfig, resume: bool = False):
    """Train and export the ControlNet; returns the path of the exported ControlNetModel folder."""
    session = TrainingSession(config, "controlnet", resume)
    acc = session.accelerator

    columns = {config.image_column: "image", config.caption_column: "text", config.condition: "hint",
               **object_columns(config)}
    hints = ("hint", *object_hints(config))
    dataset = load_image_dataset(config.data, columns)
    val_set = load_image_dataset(config.validation_data, columns) if config.validation_data else dataset
    base = load_base(config.base)
    vae, text_encoder, tokenizer = base.vae.to(acc.device), base.text_encoder.to(acc.device), base.tokenizer
    model = ControlledUNet(base.unet, build_controlnet(base.unet, vae, config.hint_channels,
                                                       config.init_from))
    model.controlnet.train()
    # the ControlNet learns the base's own parameterisation (ε or v), read from its scheduler config
    noise_scheduler = sd_noise_scheduler(base.scheduler_config.get("prediction_type", "epsilon"))

    cache, dataset, transform = training_rows(config.latent_cache, acc, vae, dataset, config.resolution, hints=hints)
    loader = make_dataloader(dataset, transform, config.batch_size, config.num_workers)
    val = first_rows(val_set, config.num_validation_images,
                     RowTransform(config.resolution, targets=("image",), hints=("hint",), caption="text"))

    optimizer = make_optimizer(model.controlnet.parameters(), config)
    lr_scheduler = make_lr_scheduler(optimizer, config, acc.num_processes)
    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.controlnet.parameters(), decay=config.ema_decay)
        ema.to(acc.device)
        acc.register_for_checkpointing(ema)
    model, optimizer, loader, lr_scheduler = acc.prepare(model, optimizer, loader, lr_scheduler)
    assert_locked(acc.unwrap_model(model), optimizer, vae, text_encoder)
    session.restore()

    bar = session.progress()
    for batch in batches(acc, loader, session.micro) if not session.done else ():
        noisy, target, t, ids = noisy_batch(vae, noise_scheduler, tokenizer, batch, config.caption_dropout,
                                            session.step_generator(), acc.device, cache)
        objects = batch_objects(batch, config)
        with torch.no_grad():
            text_emb = text_encoder(ids)[0]
        with acc.accumulate(model), acc.autocast():
            err = (model(noisy, t, text_emb, batch["hint"]).float() - target.float()).pow(2)
            loss = weighted_mean(err, objects, config.object_weight)
            session.optimize(model, loss, optimizer, lr_scheduler)
        if not acc.sync_gradients:
            continue
        if ema is not None:
            ema.step(acc.unwrap_model(model).controlnet.parameters())
        session.end_step(bar, lr_scheduler)
        if session.should_validate() and session.is_main:
            validate(session, acc.unwrap_model(model), base, vae, text_encoder, val)
        if session.done:
            break
    bar.close()

    controlnet = acc.unwrap_model(model).controlnet.eval()
    if ema is not None:
        ema.copy_to(controlnet.parameters())
    return session.export(lambda d: controlnet.save_pretrained(d, safe_serialization=True))


@torch.no_grad()
def validate(session: TrainingSession, net: ControlledUNet, base, vae, text_encoder, val: dict) -> None:
    """Grid rows condition | generated | real, the condition fidelity and its curve."""
    cfg = session.config
    net.controlnet.eval()
    hints = tensor_to_pil(val["hint"], signed=False)
    generated = sample_controlnet(
        vae, text_encoder, base.tokenizer, net.unet, net.controlnet, base.scheduler_config,
        list(val["text"]), hints, cfg.resolution, cfg.num_inference_steps, cfg.guidance_scale,
        cfg.conditioning_scale, cfg.seed,
    )
    real = tensor_to_pil(val["image"], signed=True)
    make_grid([im for r in zip(hints, generated, real) for im in r], cols=3).save(
        session.out / "samples" / f"step-{session.step:07d}.png"
    )
    fidelity = condition_fidelity(cfg.condition, hints, generated)
    session.metrics.log(session.step, fidelity=fidelity)
    plot_metric(session.out / "metrics.csv", "fidelity", session.out / "fidelity.png",
                f"{cfg.condition} fidelity (edge F1, 2 px)")
    net.controlnet.train()
