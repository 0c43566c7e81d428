"""Recipe: train a ControlNet for a transformer base (SD3 / SD3.5, Flux.1) with the flow-matching loss.

The ControlNet recipe (``controlnet.py``) hands over here when its base is a transformer: the same
config, data, latent cache, caption dropout, checkpoints and exact resume, the paper's contract (the
base locked, only the ControlNet trains, zero-initialised outputs so step 0 is the base), with what
a rectified-flow transformer changes:

* **the copy** -- the first ``controlnet_layers`` joint blocks of the transformer (diffusers'
  ``SD3ControlNetModel.from_transformer``; Flux: ``FluxControlNetModel.from_transformer`` with as
  many double and half as many single blocks), its embeddings copied, the condition's patch
  embedding and every output layer zero;
* **the condition** -- the hint's VAE latents (posterior mean, shifted and scaled; packed into 2x2
  patches for Flux), as ``mmdit.py`` feeds them when sampling;
* **the loss** -- flow matching (Esser et al. 2024, Sec. 2-3.1): ``x_t = (1 - t) x_0 + t ε`` with
  ``t`` logit-normal (their best sampling of the timestep), the network regresses ``v = ε - x_0``;
  the transformer reads ``t · 1000`` (SD3) or ``t`` (Flux) as diffusers' pipelines give it;
  Flux's embedded guidance is fed ``guidance_scale`` (diffusers' ``train_controlnet_flux.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from controlstack.control import Control
from controlstack.errors import require
from controlstack.io.png import make_grid
from controlstack.io.settings import write_settings
from controlstack.mmdit import control_latents
from controlstack.pipeline import Pipeline
from controlstack.training.data import RowTransform, batches, first_rows, load_image_dataset, make_dataloader
from controlstack.training.diffusion import drop_captions
from controlstack.training.latents import batch_latents, training_rows
from controlstack.training.session import TrainingSession, make_lr_scheduler, make_optimizer
from controlstack.training.validation import condition_fidelity, plot_metric, tensor_to_pil


def check_config(config) -> None:
    """What the U-Net recipe's options mean nothing for here: one line each."""
    require(config.architecture == "copy" and config.zero_init and not config.init_from,
            "a transformer base's ControlNet is a fresh zero-initialised copy of its first blocks; leave "
            "architecture / zero_init / init_from at their defaults")
    require(config.injection == "sum" and config.rebalance_probability == 0 and config.conservativity_weight == 0,
            "Minimal Impact's options act on a U-Net's skip residuals; a transformer base trains a plain ControlNet")
    require(not getattr(config, "tasks", ()), "Omni's task tokens are for U-Net bases")


def build(transformer, family, layers: int):
    """A fresh ControlNet copying the first ``layers`` blocks (0: a quarter of them, at least one)."""
    import diffusers  # local: heavy, only this path needs it

    c = transformer.config
    if family.network == "flux":
        n = layers or max(1, c.num_layers // 4)
        return diffusers.FluxControlNetModel.from_transformer(
            transformer, num_layers=n, num_single_layers=max(1, n // 2), attention_head_dim=c.attention_head_dim,
            num_attention_heads=c.num_attention_heads)
    n = layers or max(1, c.num_layers // 4)
    # SD3's last joint block updates no text tokens (context_pre_only): a ControlNet's blocks all do
    require(n < c.num_layers, f"config key 'controlnet_layers' ({n}) must be below the base's {c.num_layers} joint "
                              "blocks (its last one is text-read-only)")
    cn = diffusers.SD3ControlNetModel.from_config({**dict(c), "num_layers": n, "extra_conditioning_channels": 0})
    for part in ("pos_embed", "time_text_embed", "context_embedder"):  # diffusers' from_transformer, unmutated
        getattr(cn, part).load_state_dict(getattr(transformer, part).state_dict())
    cn.transformer_blocks.load_state_dict(transformer.transformer_blocks.state_dict(), strict=False)
    with torch.no_grad():
        for p in cn.pos_embed_input.parameters():
            p.zero_()
    return cn


def flow_batch(latents: torch.Tensor, generator: torch.Generator):
    """``(x_t, v target, t)``: ``t`` logit-normal, ``x_t = (1 - t) x_0 + t ε``, ``v = ε - x_0``."""
    t = torch.sigmoid(torch.randn(latents.shape[0], generator=generator)).to(latents)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    s = t.view(-1, *[1] * (latents.dim() - 1))
    return (1 - s) * latents + s * noise, noise - latents, t


class ControlledTransformer(torch.nn.Module):
    """Locked transformer + trainable ControlNet, one module so DDP sees the whole forward."""

    def __init__(self, transformer, controlnet, family, guidance: float):
        super().__init__()
        self.transformer, self.controlnet = transformer, controlnet
        self.family, self.guidance = family, guidance

    def forward(self, noisy, t, hidden, pooled, cond, size) -> torch.Tensor:
        if self.family.network != "flux":
            timestep = t * 1000
            residuals = self.controlnet(hidden_states=noisy, timestep=timestep, encoder_hidden_states=hidden,
                                        pooled_projections=pooled, controlnet_cond=cond, return_dict=False)[0]
            return self.transformer(hidden_states=noisy, timestep=timestep, encoder_hidden_states=hidden,
                                    pooled_projections=pooled, block_controlnet_hidden_states=residuals,
                                    return_dict=False)[0]
        ids = {"txt_ids": torch.zeros(hidden.shape[1], 3).to(hidden), "img_ids": self.family.image_ids(*size, hidden)}
        kw = {"timestep": t, "encoder_hidden_states": hidden, "pooled_projections": pooled, **ids}
        g = torch.full_like(t, self.guidance)
        double, single = self.controlnet(hidden_states=noisy, controlnet_cond=cond, return_dict=False,
                                         guidance=g if self.controlnet.config.guidance_embeds else None, **kw)
        return self.transformer(hidden_states=noisy, controlnet_block_samples=double,
                                controlnet_single_block_samples=single, return_dict=False,
                                guidance=g if self.transformer.config.guidance_embeds else None, **kw)[0]


def encode_captions(base, captions: list[str]):
    """The family's text conditioning for a batch of captions: ``(hidden, pooled)``."""
    pairs = [base.family.encode_text(base, c, 1) for c in captions]
    return torch.cat([h for h, _ in pairs]), torch.cat([p for _, p in pairs])


def train(config, base, resume: bool = False):
    """Train and export a transformer base's ControlNet (``config``: the ControlNet recipe's)."""
    check_config(config)
    session = TrainingSession(config, "controlnet", resume)
    acc = session.accelerator
    family = base.family
    for module in (base.text_encoder_2, base.text_encoder_3):
        if module is not None:
            module.eval().requires_grad_(False)
    columns = {config.image_column: "image", config.caption_column: "text", config.condition: "hint"}
    dataset = load_image_dataset(config.data, columns)
    val_set = load_image_dataset(config.validation_data, columns) if config.validation_data else dataset
    controlnet = build(base.unet, family, config.controlnet_layers).train()
    model = ControlledTransformer(base.unet, controlnet, family, config.guidance_scale)
    cache, dataset, transform = training_rows(config.latent_cache, acc, base.vae, dataset, config.resolution,
                                              hints=("hint",))
    loader = make_dataloader(dataset, transform, config.batch_size, config.num_workers)
    val = first_rows(val_set, config.num_validation_images,
                     RowTransform(config.resolution, targets=("image",), hints=("hint",), caption="text"))
    optimizer = make_optimizer([{"params": list(controlnet.parameters())}], config)
    lr_scheduler = make_lr_scheduler(optimizer, config, acc.num_processes)
    model, optimizer, loader, lr_scheduler = acc.prepare(model, optimizer, loader, lr_scheduler)
    locked = [base.unet, base.vae, base.text_encoder, base.text_encoder_2, base.text_encoder_3]
    assert not any(p.requires_grad for m in locked if m is not None for p in m.parameters()), "a base weight trains"
    session.restore()

    bar = session.progress()
    for batch in batches(acc, loader, session.micro) if not session.done else ():
        g = session.step_generator()
        with torch.no_grad():
            latents = batch_latents(base.vae, batch, g, acc.device, cache)
            cond = control_latents(base.vae, controlnet, batch["hint"])
            hidden, pooled = encode_captions(base, drop_captions(batch["text"], config.caption_dropout, g))
        noisy, target, t = flow_batch(latents, g)
        size = tuple(latents.shape[-2:])
        noisy, target, cond = (family.pack(x) for x in (noisy, target, cond))
        with acc.accumulate(model), acc.autocast():
            loss = F.mse_loss(model(noisy, t, hidden, pooled, cond, size).float(), target.float())
            session.optimize(model, loss, optimizer, lr_scheduler)
        if not acc.sync_gradients:
            continue
        session.end_step(bar, lr_scheduler)
        if session.should_validate() and session.is_main:
            validate(session, base, acc.unwrap_model(model).controlnet, val)
        if session.done:
            break
    bar.close()
    trained = acc.unwrap_model(model).controlnet.eval()

    def save(folder):
        trained.save_pretrained(folder, safe_serialization=True)
        write_settings(folder, {"training": {"condition": config.condition}})

    return session.export(save)


@torch.no_grad()
def validate(session: TrainingSession, base, controlnet, val: dict) -> None:
    """Grid rows condition | generated | real through the project's Pipeline, and the fidelity curve."""
    cfg = session.config
    controlnet.eval()
    hints = tensor_to_pil(val["hint"], signed=False)
    pipe = Pipeline(base)
    generated = [pipe(p, [Control(controlnet, h, weight=cfg.conditioning_scale)], steps=cfg.num_inference_steps,
                      cfg=cfg.guidance_scale, seed=cfg.seed + i, width=cfg.resolution, height=cfg.resolution,
                      progress=False)[0] for i, (p, h) in enumerate(zip(val["text"], hints))]
    fidelity = condition_fidelity(cfg.condition, hints, generated)
    real = tensor_to_pil(val["image"], signed=True)
    make_grid([im for r in zip(hints, generated, real) for im in r], cols=3).save(
        session.out / "samples" / f"step-{session.step:07d}.png")
    session.metrics.log(session.step, fidelity=fidelity)
    plot_metric(session.out / "metrics.csv", "fidelity", session.out / "fidelity.png",
                f"{cfg.condition} fidelity (edge F1, 2 px)")
    controlnet.train()
