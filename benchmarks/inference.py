"""Inference speed: controlstack's tiers vs diffusers' StableDiffusionControlNetPipeline, same weights.

Builds one model of SD-1.5 layout at reduced width (block_out_channels 64/128/256/256, cross-
attention where SD-1.5 has it), at 256x256 images (32x32 latents) by default -- ``--size 512``
gives SD's 64x64 latents at ~4x the time --, and prints, in one run, for 1 and 3 controls with the
full window and 0-0.5: images/s of diffusers and of each tier (parity, compiled, fast), the ratio,
PSNR against diffusers' image, and each one's fraction of the physical limit (model FLOPs per
image over the measured fp32 GEMM rate). Then, each in a process of its own for one image with
one control: start-up (compiling into an empty cache = first process; loading it = second
process) and peak memory (max RSS).

    .venv/bin/python benchmarks/inference.py                 # the full benchmark (~30 min here, most of it compiling)
    .venv/bin/python benchmarks/inference.py --size 512      # SD-1.5's latent size
    .venv/bin/python benchmarks/inference.py --quick         # 4 steps, 1 run, no start-up table: a smoke test
    .venv/bin/python benchmarks/inference.py --family sdxl   # the SDXL layout, against StableDiffusionXLControlNetPipeline

``--family sdxl`` builds SDXL's layout at reduced width: block_out_channels 64/128/256 (SDXL:
320/640/1280) with no attention at the first level and 1/2/2 transformer layers (SDXL: 1/2/10),
two text encoders (hidden 128 + 128, the second with the pooled projection) and the text-time
added embedding (size ids embedded at 32 each; SDXL: 256).

``--family sd3`` / ``--family flux`` build the transformer layouts at reduced width (transformer.py
beside this file): against ``StableDiffusion3ControlNetPipeline`` / ``FluxControlNetPipeline``, with
the flow Euler sampler; the FLOP count there is measured on one step of our parity pipeline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from controlstack import Control, Pipeline
from controlstack.models.components import SDComponents
from controlstack.models.tiny import byte_level_tokenizer, tiny_text_encoder, tiny_vae
from controlstack.sampling import make_scheduler

TRANSFORMERS = ("sd3", "flux")


def build(seed: int = 0, family: str = "sd") -> tuple[SDComponents, list]:
    from diffusers import ControlNetModel, UNet2DConditionModel

    if family in TRANSFORMERS:
        from transformer import build_transformer  # this folder's module

        return build_transformer(seed, family)

    torch.manual_seed(seed)
    tok = byte_level_tokenizer(max_length=77)
    if family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(64, 128, 256), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
            cross_attention_dim=256, addition_embed_type="text_time", addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=6 * 32 + 128, norm_num_groups=32,
        ).eval()
        comps = SDComponents(unet, tiny_vae(seed + 1, (32, 64, 64, 64)),
                             tiny_text_encoder(seed + 2, hidden_size=128, vocab_size=len(tok)), tok,
                             text_encoder_2=tiny_text_encoder(seed + 3, hidden_size=128, vocab_size=len(tok),
                                                              with_projection=True),
                             tokenizer_2=byte_level_tokenizer(max_length=77))
    else:
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
        ).eval()
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


def reference_pipeline(comps, controlnet, family: str = "sd"):
    """diffusers' ControlNet pipeline of the model's family, on the same weights."""
    if family in TRANSFORMERS:
        from transformer import reference_transformer_pipeline  # this folder's module

        return reference_transformer_pipeline(comps, controlnet, family)
    if comps.text_encoder_2 is not None:
        from diffusers import StableDiffusionXLControlNetPipeline

        return StableDiffusionXLControlNetPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet, controlnet=controlnet,
            scheduler=make_scheduler("unipc"), add_watermarker=False)
    from diffusers import StableDiffusionControlNetPipeline

    return StableDiffusionControlNetPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        controlnet=controlnet, scheduler=make_scheduler("unipc"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


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
    kw = {}
    if comps.text_encoder_2 is not None:  # SDXL: pooled text and the six size ids
        kw = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 128), "time_ids": torch.full((2, 6), float(size))}}
    runner, cnr = UNetRunner(comps.unet), ControlNetRunner(cns[0])
    feats = cnr.embed_hint(torch.rand(1, 3, size, size))
    unet = count(lambda: runner(x, t, emb, **kw))
    controlnet = count(lambda: cnr(x, t, emb, feats, **kw))
    hint = count(lambda: cnr.embed_hint(torch.rand(1, 3, size, size)))
    vae = count(lambda: comps.vae.decode(torch.randn(1, 4, size // 8, size // 8)))
    return steps * (unet + n_controls * active_fraction * controlnet) + n_controls * hint + vae


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


TIER_NAMES = ("parity", "compiled", "fast")


def tier_pipeline(comps, tier: str) -> Pipeline:
    return Pipeline(comps, name="bench").optimize(tier) if tier != "parity" else Pipeline(comps, name="bench")


def timed(fns: dict, runs: int) -> tuple[dict, dict]:
    """Median seconds of each callable, run round-robin (a, b, c, a, b, c, ...) after one warm-up
    each, so a drift in machine load hits all alike; returns ({name: seconds}, {name: last output},
    {name: MiB its first call needed beyond what was resident before it})."""
    outs, extra = {k: fn() for k, fn in fns.items()}, {}
    times: dict = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            before = reset_peak() if k not in extra else 0.0  # working memory of a warm call
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
            extra.setdefault(k, peak_mib() - before)
    return {k: statistics.median(v) for k, v in times.items()}, outs, extra


def reset_peak() -> float:
    """Reset the peak-RSS mark (Linux ``clear_refs``); returns the resident MiB now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return peak_mib()


def child(args) -> None:
    """One image, one control, in this process: start-up seconds, compile / load seconds, peak RSS."""
    import json

    comps, cns = build(family=args.family)
    image = hint(args.size, 0)
    reset_peak()  # the peak of the generation, not of building the models
    t = time.perf_counter()
    if args.child == "diffusers":
        theirs(args, comps, cns, [image], 1)()
        seconds = {}
    else:
        pipe = tier_pipeline(comps, args.child)
        ours(args, pipe, cns, [image], 1)()
        graphs = pipe.runners.graphs()
        seconds = {k: sum(g.seconds[k] for g in graphs) for k in ("compile", "load")}
    print(json.dumps({"first_image_s": time.perf_counter() - t, **seconds, "peak_mib": peak_mib()}))


def sampler(family: str) -> tuple[str, float]:
    """The sampler and guidance scale a family's benchmark uses (flow Euler on the transformers)."""
    return ("euler", 3.5 if family == "flux" else 5.0) if family in TRANSFORMERS else ("unipc", 7.5)


def theirs(args, comps, cns, hints, n, end=1.0):
    """diffusers' pipeline for ``n`` controls with window 0-``end``: a zero-argument generation."""
    from diffusers import MultiControlNetModel

    if args.family in TRANSFORMERS:
        from transformer import multi_controlnet  # this folder's module

        cn = cns[0] if n == 1 else multi_controlnet(args.family, cns[:n])
    else:
        cn = cns[0] if n == 1 else MultiControlNetModel(cns[:n])
    ref = reference_pipeline(comps, cn, args.family)
    ref.set_progress_bar_config(disable=True)
    image = hints[0] if n == 1 else hints[:n]
    key = "control_image" if args.family in TRANSFORMERS else "image"
    scale = {} if n == 1 or args.family not in TRANSFORMERS else {"controlnet_conditioning_scale": [1.0] * n}
    cfg = sampler(args.family)[1]
    return lambda: ref("a photo", **{key: image}, num_inference_steps=args.steps, guidance_scale=cfg,
                       control_guidance_end=end,
                       generator=torch.Generator("cpu").manual_seed(0), output_type="np", width=args.size,
                       height=args.size, **scale).images


def ours(args, pipe, cns, hints, n, end=1.0):
    controls = [Control(cns[i], hints[i], end=end) for i in range(n)]
    name, cfg = sampler(args.family)
    return lambda: pipe("a photo", controls=controls, steps=args.steps, cfg=cfg, seed=0, scheduler=name,
                        output_type="np", progress=False, width=args.size, height=args.size)


def peak_mib() -> float:
    """Peak resident memory since the last reset (VmHWM), else since the start (ru_maxrss)."""
    import resource

    for line in Path("/proc/self/status").read_text().splitlines() if Path("/proc/self/status").exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def startup_table(args) -> None:
    """Each tier twice in fresh processes sharing one empty cache: compile, then load."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    print(f"\n{'one image, 1 control, own process':34s} {'first image s':>13s} {'compile s':>9s} {'load s':>7s}"
          f" {'peak MiB':>9s}")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "CONTROLSTACK_CACHE": cache}
        for name in ("diffusers", *TIER_NAMES):
            for which in ("first process", "second process") if name in ("compiled", "fast") else ("",):
                cmd = [sys.executable, __file__, "--child", name, "--size", str(args.size), "--steps", str(args.steps),
                       "--family", args.family]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if done.returncode:
                    print(f"{name}: failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{(name + ', ' + which) if which else name:34s} {r['first_image_s']:13.1f} "
                      f"{r.get('compile', 0):9.1f} {r.get('load', 0):7.1f} {r['peak_mib']:9.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="4 steps, 1 run, no start-up table")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--family", default="sd", choices=("sd", "sdxl", *TRANSFORMERS),
                    help="the model layout: SD-1.5's (default), SDXL's, SD3's or Flux's, all at reduced width")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up / peak-memory table")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.runs = 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    comps, cns = build(family=args.family)
    pipes = {name: tier_pipeline(comps, name) for name in TIER_NAMES}
    hints = [hint(args.size, k) for k in range(3)]
    name, cfg = sampler(args.family)
    print(f"# {args.family} layout, {args.size}x{args.size}, {args.steps} steps, {name}, cfg {cfg:g}, median of "
          f"{args.runs}, {torch.get_num_threads()} threads; fast = {pipes['fast'].tier.describe()}")

    rate = gemm_rate()
    print(f"measured fp32 GEMM rate: {rate / 1e9:.1f} GFLOP/s")
    print(f"\n{'case':26s} {'pipeline':10s} {'img/s':>8s} {'ratio':>6s} {'PSNR dB':>8s} {'GFLOP/img':>10s}"
          f" {'% of limit':>10s} {'+MiB':>6s}")
    for n, end in ((1, 1.0), (3, 1.0), (1, 0.5), (3, 0.5)):
        label = f"{n} control{'s' if n > 1 else ''}" + (f", window 0-{end:g}" if end < 1 else "")
        fns = {"diffusers": theirs(args, comps, cns, hints, n, end),
               **{name: ours(args, p, cns, hints, n, end) for name, p in pipes.items()}}
        times, outs, extra = timed(fns, args.runs)
        if args.family in TRANSFORMERS:
            from transformer import measured_flops  # this folder's module

            flops = measured_flops(args, pipes["parity"], cns, hints, n, end, ours)
        else:
            flops = flops_per_image(comps, cns, n, args.steps, args.size, end)
        for name, t in times.items():
            quality = "" if name == "diffusers" else f"{psnr(outs[name], outs['diffusers']):8.1f}"
            print(f"{label:26s} {name:10s} {1 / t:8.4f} {times['diffusers'] / t:6.2f} {quality:>8s} "
                  f"{flops / 1e9:10.1f} {100 * flops / t / rate:9.1f}% {extra[name]:6.0f}")
            label = ""
    if not (args.quick or args.no_startup):
        startup_table(args)


if __name__ == "__main__":
    main()
