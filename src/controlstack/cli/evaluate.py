"""``controlstack evaluate --scenes N --seed S --controls canny,depth [--models ...] [--modes ...] [--cfg ...] [--steps K] --out DIR``.

Generates a grid (model × control type × mode × CFG × prompt style) on held-out world scenes and
measures it: FID, KID, CLIP score and condition fidelity, with each metric's reference points.
``--config FILE`` reads the whole grid from YAML (the keys of ``EvaluateConfig``; flags given on
the command line override it). Writes DIR/metrics.json and the self-contained DIR/report.html;
generations are cached in DIR/images, so a rerun resumes. A thin shell over
``controlstack.evaluation.evaluate.run``.
"""

from __future__ import annotations

import argparse

from controlstack.cli.text import plain
from controlstack.errors import ControlstackError


def _names(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError("give at least one comma-separated value")
    return items


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="FID, KID, CLIP score and condition fidelity of a grid of settings, with an HTML report",
        description=plain(__doc__.splitlines()[0]))
    p.add_argument("--config", default=None, help="YAML grid (EvaluateConfig keys); flags override it")
    p.add_argument("--scenes", type=int, default=None, help="held-out world scenes per row (default 8)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed of scene i is seed + i (default 0)")
    p.add_argument("--start", type=int, default=None, help="first held-out scene index (default 0)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="your own datasets folder (image, text, a column per control type: controlstack dataset "
                        "build makes one) instead of the world's held-out scenes")
    p.add_argument("--base", default=None, help="base model folder or file (default: the bundled model)")
    p.add_argument("--controls", type=_names, default=None,
                   help="control types, comma-separated: canny,depth,seg,pose,normal,softedge,scribble; none = no "
                        "control (default canny,depth)")
    p.add_argument("--models", type=_names, default=None,
                   help="ControlNet per control type: plain (its own), mi (mi-TYPE), omni (the Omni ControlNet), or a "
                        "path (default plain)")
    p.add_argument("--modes", type=_names, default=None,
                   help="injection modes: auto (the models' recommendation), balanced, controlnet, prompt, sum, mi, ...; "
                        "options as NAME:KEY=VALUE, e.g. controlnet:layer_weights=uniform")
    p.add_argument("--cfg", type=_numbers, default=None, help="CFG scales, comma-separated (default 7.5)")
    p.add_argument("--prompt-styles", type=_names, default=None, help="empty,brief,full (default full)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument("--scheduler", default=None, help="sampler (default unipc)")
    p.add_argument("--size", type=int, default=None, help="image size (default: the base's native size)")
    p.add_argument("--features", default=None,
                   help="FID / KID network: a FeatureNet folder or NVIDIA's TorchScript Inception .pt (default: bundled)")
    p.add_argument("--trust-torchscript", action="store_true", default=None,
                   help="allow --features to be TorchScript, which runs code when loaded")
    p.add_argument("--clip", default=None, help="CLIP folder (CLIPModel + tokenizer + preprocessor; default: bundled)")
    p.add_argument("--optimize", default=None, choices=("parity", "compiled", "fast"),
                   help="speed tier the images are made in (default parity; docs/speed.md)")
    p.add_argument("--preset", default=None,
                   help="a published protocol's settings and measures: controlnet++ (UniPC 20 steps, CFG 7.5, "
                        "balanced, 4 images per condition; canny F1 pixel by pixel, soft-edge SSIM, depth RMSE on "
                        "0-255 maps, seg mIoU)")
    p.add_argument("--out", required=True, help="output folder (metrics.json, report.html, images/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from controlstack.evaluation.evaluate import EvaluateConfig  # local: keeps CLI start-up light
    from controlstack.evaluation.evaluate import run as evaluate  # local: keeps CLI start-up light

    flags = {"scenes": args.scenes, "seed": args.seed, "start": args.start, "data": args.data, "base": args.base,
             "controls": args.controls, "models": args.models, "modes": args.modes, "cfg": args.cfg,
             "prompt_styles": args.prompt_styles, "steps": args.steps, "scheduler": args.scheduler,
             "size": args.size, "features": args.features, "trust_torchscript": args.trust_torchscript,
             "clip": args.clip, "optimize": args.optimize, "preset": args.preset}
    try:
        config = (EvaluateConfig.from_yaml(args.config, **flags) if args.config else
                  EvaluateConfig(**{k: v for k, v in flags.items() if v is not None}))
    except TypeError as exc:  # a YAML value of the wrong shape for a field
        raise ControlstackError(f"bad evaluate config: {exc}") from None
    report = evaluate(config, args.out)
    print(summary(report))
    print(f"{len(report['rows'])} rows on {report['scenes']} scenes: {args.out}/metrics.json, {args.out}/report.html")
    return 0


def summary(report: dict) -> str:
    """The rows as a plain-text table (the report has them all, with plots and grids)."""
    from controlstack.evaluation.html import label  # local: keeps CLI start-up light

    lines = [f"{'row':52s} {'FID':>8s} {'KID':>8s} {'CLIP':>6s}  fidelity"]
    for r in report["rows"]:
        fid = ", ".join(f"{k} {v:.3f}" for k, v in r["fidelity"].items() if k != "tv")
        lines.append(f"{label(r):52s} {r['fid']:8.3f} {r['kid']:8.4f} {r['clip_score']:6.2f}  {fid}")
    ref = report["reference"]
    lines.append(f"{'reference: real renders':52s} {ref['fid_real_split']:8.3f} {ref['kid_real_split']:8.4f} "
                 f"{ref['clip_real_matched']:6.2f}  (CLIP with shuffled captions {ref['clip_real_shuffled']:.2f})")
    return "\n".join(lines)
