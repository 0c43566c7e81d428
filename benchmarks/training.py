"""Training throughput (images/s) of each recipe at its default small config, fp32 and bf16 autocast.

Times the recipe's own training step (forward, loss, backward, AdamW step) on random 128x128
batches with the shipped configs' model sizes (``src/controlstack/configs/train/*.yaml``); data
loading and validation are excluded. bf16 on CPUs without native bf16 (AVX2-only) is emulated
and very slow, so it is measured with a smaller batch (``--bf16-batch``); images/s stays comparable.

    .venv/bin/python benchmarks/training.py [--steps 3] [--recipes vae,base,controlnet]
    .venv/bin/python benchmarks/training.py --recipes controlnet,mi-stage1,mi-stage2 --no-bf16

``mi-stage1`` is the ControlNet step with the ``mi`` injection in the forward, ``mi-stage2`` adds
the conservativity term (one probe on 4 of the 16 samples, as the bundle's ``mi_stage2.yaml``):
their ratio to ``controlnet`` is Minimal Impact ControlNet's training overhead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from controlstack.injection import make_injection
from controlstack.training.base import BaseConfig, TextToImage, build_text_encoder, build_unet
from controlstack.training.conservativity import conservativity_loss, twice_differentiable
from controlstack.training.controlnet import ControlledUNet, ControlNetConfig, build_controlnet
from controlstack.training.diffusion import add_noise, encode_latents, sd_noise_scheduler, tokenize
from controlstack.training.precision import bf16_speedup
from controlstack.training.session import make_optimizer
from controlstack.training.tokenizer import build_tokenizer
from controlstack.training.vae import VAEConfig, VAELoss, build_vae

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "controlstack" / "configs" / "train"
CAPTIONS = ["a red striped sphere left of a blue cube", "a dog on grass", "a person next to a green cone"]


def load(cls, name):
    return cls.from_yaml(CONFIGS / f"{name}.yaml", data="unused")


def make_step(recipe: str, g: torch.Generator):
    """(step(batch_size, dtype) -> None, config) for one recipe with default-size random models."""
    vcfg = load(VAEConfig, "vae")
    vae = build_vae(vcfg)
    if recipe == "vae":
        model = VAELoss(vae, vcfg).train()
        opt = make_optimizer(model.parameters(), vcfg)

        def step(b, autocast):
            x = torch.rand(b, 3, vcfg.resolution, vcfg.resolution, generator=g) * 2 - 1
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, _ = model(x, g)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return step, vcfg

    vae.eval().requires_grad_(False)
    bcfg = load(BaseConfig, "base")
    tokenizer = build_tokenizer("dataset", bcfg.max_length, CAPTIONS)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(bcfg, bcfg.resolution // factor, vae.config.latent_channels)
    text_encoder = build_text_encoder(bcfg, tokenizer)
    sched = sd_noise_scheduler()
    if recipe == "base":
        model = TextToImage(unet, text_encoder).train()
        opt = make_optimizer(model.parameters(), bcfg)

        def step(b, autocast):
            x = torch.rand(b, 3, bcfg.resolution, bcfg.resolution, generator=g) * 2 - 1
            noisy, noise, t = add_noise(sched, encode_latents(vae, x, g), g)
            ids = tokenize(tokenizer, [CAPTIONS[i % 3] for i in range(b)], "cpu")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.mse_loss(model(noisy, t, ids).float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return step, bcfg

    ccfg = load(ControlNetConfig, "controlnet")
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    injection = make_injection("mi" if recipe.startswith("mi-") else "sum")
    model = ControlledUNet(unet, build_controlnet(unet, vae, ccfg.hint_channels), injection)
    with torch.no_grad():  # a trained-like ControlNet: zero convolutions at 0 would make stage 2's term vanish
        for layer in [*model.controlnet.controlnet_down_blocks, model.controlnet.controlnet_mid_block]:
            layer.weight.normal_(0, 0.02, generator=g)
    opt = make_optimizer(model.controlnet.parameters(), ccfg)

    def step(b, autocast):
        x = torch.rand(b, 3, ccfg.resolution, ccfg.resolution, generator=g) * 2 - 1
        hint = torch.rand(b, 3, ccfg.resolution, ccfg.resolution, generator=g)
        noisy, noise, t = add_noise(sched, encode_latents(vae, x, g), g)
        with torch.no_grad():
            emb = text_encoder(tokenize(tokenizer, [CAPTIONS[i % 3] for i in range(b)], "cpu"))[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if recipe == "mi-stage2":
                x = noisy.detach().clone().requires_grad_(True)
                with twice_differentiable("cpu"):
                    out = model(noisy, t, emb, hint, control_input=x)
                    term, _ = conservativity_loss(out[:4], x, 1, g)
                loss = F.mse_loss(out.float(), noise) + 0.01 * term
            else:
                loss = F.mse_loss(model(noisy, t, emb, hint).float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step, ccfg


def images_per_s(step, batch: int, steps: int, autocast: bool) -> float:
    step(batch, autocast)  # warm-up (oneDNN kernel creation)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(batch, autocast)
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--recipes", default="vae,base,controlnet")
    ap.add_argument("--bf16-batch", type=int, default=2)
    ap.add_argument("--bf16-steps", type=int, default=1)
    ap.add_argument("--no-bf16", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"bf16/fp32 matmul speed-up probe: {bf16_speedup():.3f}x")
    print(f"{'recipe':<11} {'params (trainable)':>19} {'batch':>5} {'fp32 img/s':>11} {'bf16 img/s':>11}")
    for recipe in args.recipes.split(","):
        g = torch.Generator().manual_seed(0)
        step, cfg = make_step(recipe, g)
        params = _trainable_params(step)
        fp32 = images_per_s(step, cfg.batch_size, args.steps, autocast=False)
        bf16 = float("nan") if args.no_bf16 else images_per_s(step, args.bf16_batch, args.bf16_steps, autocast=True)
        print(f"{recipe:<11} {params / 1e6:>18.2f}M {cfg.batch_size:>5} {fp32:>11.2f} {bf16:>11.3f}", flush=True)


def _trainable_params(step) -> int:
    """Parameters of the optimiser the step closes over (the trainable ones)."""
    for cell in step.__closure__ or ():
        obj = cell.cell_contents
        if isinstance(obj, torch.optim.Optimizer):
            return sum(p.numel() for grp in obj.param_groups for p in grp["params"])
    return 0


if __name__ == "__main__":
    main()
