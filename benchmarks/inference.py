"""Inference speed: controlstack vs diffusers' StableDiffusionControlNetPipeline, same weights.

Builds one model of SD-1.5 layout at reduced width (block_out_channels 64/128/256/256, cross-
attention where SD-1.5 has it), at 256x256 images (32x32 latents) by default -- ``--size 512``
gives SD's 64x64 latents at ~4x the time --, runs both pipelines with the same
seed for ``--steps`` steps, and prints images/s (median of ``--runs`` after one warm-up) and the
ratio for: 1 control; 3 controls; 1 control with window 0-0.5; and our "fast" mode with its PSNR
against the float32 output. Also prints the physical limit: model FLOPs per image
(torch.utils.flop_counter) over the measured fp32 GEMM rate, and each pipeline's fraction of it.

    .venv/bin/python benchmarks/inference.py                 # the full benchmark (~10 min here)
    .venv/bin/python benchmarks/inference.py --quick         # 4 steps, 256 px, 1 run: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from controlstack import Control, Pipeline
from controlstack.models.tiny import SDComponents, byte_level_tokenizer, tiny_text_encoder, tiny_vae
from controlstack.sampling import make_scheduler


def build(seed: int = 0) -> tuple[SDComponents, list]:
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    tok = byte_level_tokenizer(max_length=77)
    comps = SDComponents(unet, tiny_vae(seed + 1, (32, 64, 64, 64)),
                         tiny_text_encoder(seed + 2, hidden_size=256, vocab_size=len(tok)), tok)
    cns = []
    for i in range(3):
        torch.manual_seed(seed + 10 + i)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)).eval()
        with torch.no_grad():  # non-zero zero-convs so the control matters
            for layer in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block]:
                layer.weight.normal_(0, 0.02)
        cns.append(cn)
    return comps, cns


def hint(size: int, k: int) -> PIL.Image.Image:  # noqa: F821
    from PIL import Image

    rng = np.random.default_rng(k)
    a = (rng.random((size // 8, size // 8)) > 0.8).astype(np.uint8) * 255
    return Image.fromarray(a).resize((size, size)).convert("RGB")


def timed_pair(fn_a, fn_b, runs: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Median seconds of each of two callables, run interleaved (a, b, a, b, ...) after one warm-up
    each, so a drift in machine load hits both alike; returns (t_a, t_b, out_a, out_b)."""
    out_a, out_b = fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(runs):
        for fn, times in ((fn_a, ta), (fn_b, tb)):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
            if fn is fn_a:
                out_a = out
            else:
                out_b = out
    return statistics.median(ta), statistics.median(tb), out_a, out_b


def gemm_rate() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    n = 10
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - t)


def flops_per_image(comps, cns, n_controls, steps, size, active_fraction=1.0) -> float:
    """U-Net per step + each control's ControlNet per *active* step + one hint encoding + VAE."""
    from torch.utils.flop_counter import FlopCounterMode

    from controlstack.models.runner import ControlNetRunner, UNetRunner

    def count(fn) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    x, emb, t = torch.randn(2, 4, size // 8, size // 8), torch.randn(2, 77, 256), torch.tensor(500)
    runner, cnr = UNetRunner(comps.unet), ControlNetRunner(cns[0])
    feats = cnr.embed_hint(torch.rand(1, 3, size, size))
    unet = count(lambda: runner(x, t, emb))
    controlnet = count(lambda: cnr(x, t, emb, feats))
    hint = count(lambda: cnr.embed_hint(torch.rand(1, 3, size, size)))
    vae = count(lambda: comps.vae.decode(torch.randn(1, 4, size // 8, size // 8)))
    return steps * (unet + n_controls * active_fraction * controlnet) + n_controls * hint + vae


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="4 steps, 256 px, 1 run")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.size, args.runs = 4, 256, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline

    comps, cns = build()
    pipe = Pipeline(comps, name="bench")
    hints = [hint(args.size, k) for k in range(3)]
    common = dict(width=args.size, height=args.size)
    print(f"# {args.size}x{args.size}, {args.steps} steps, unipc, cfg 7.5, median of {args.runs}, "
          f"{torch.get_num_threads()} threads")

    def theirs(n, **kw):
        cn = cns[0] if n == 1 else MultiControlNetModel(cns[:n])
        ref = StableDiffusionControlNetPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
            controlnet=cn, scheduler=make_scheduler("unipc"), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)
        image = hints[0] if n == 1 else hints[:n]
        return lambda: ref("a photo", image=image, num_inference_steps=args.steps, guidance_scale=7.5,
                           generator=torch.Generator("cpu").manual_seed(0), output_type="np", **common, **kw
                           ).images

    def ours(n, p=pipe, start=0.0, end=1.0, controlnets=cns):
        controls = [Control(controlnets[i], hints[i], start=start, end=end) for i in range(n)]
        return lambda: p("a photo", controls=controls, steps=args.steps, cfg=7.5, seed=0, scheduler="unipc",
                         output_type="np", progress=False, **common)

    rate = gemm_rate()
    print(f"measured fp32 GEMM rate: {rate / 1e9:.1f} GFLOP/s")
    rows = []
    cases = [("1 control", 1, {}, {}), ("3 controls", 3, {}, {}),
             ("1 control, window 0-0.5", 1, {"control_guidance_end": 0.5}, {"end": 0.5})]
    reference_image = None
    for label, n, dkw, okw in cases:
        t_d, t_o, img_d, img_o = timed_pair(theirs(n, **dkw), ours(n, **okw), args.runs)
        if reference_image is None:
            reference_image = img_o
        flops = flops_per_image(comps, cns, n, args.steps, args.size, okw.get("end", 1.0))
        rows.append((label, 1 / t_d, 1 / t_o, t_d / t_o, float(np.abs(img_o - img_d).max()), flops))
    # its own copy of the weights: optimize() changes the modules' memory format in place
    fast = Pipeline(copy.deepcopy(comps), name="bench").optimize("fast")
    t_d1, t_f, _, img_f = timed_pair(theirs(1), ours(1, p=fast, controlnets=copy.deepcopy(cns[:1])), args.runs)
    print(f"\n{'case':28s} {'diffusers img/s':>16s} {'ours img/s':>11s} {'ratio':>6s} {'max|diff|':>10s}"
          f" {'GFLOP/img':>10s} {'diffusers %peak':>15s} {'ours %peak':>10s}")
    for label, d, o, r, diff, flops in rows:
        print(f"{label:28s} {d:16.4f} {o:11.4f} {r:6.2f} {diff:10.1e} {flops / 1e9:10.1f}"
              f" {100 * flops * d / rate:14.1f}% {100 * flops * o / rate:9.1f}%")
    print(f"{'fast mode, 1 control':28s} {1 / t_d1:16.4f} {1 / t_f:11.4f} {t_d1 / t_f:6.2f} "
          f"PSNR vs fp32 {psnr(img_f, reference_image):.1f} dB  ({fast.fast_description})")


if __name__ == "__main__":
    main()
