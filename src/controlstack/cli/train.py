"""``controlstack train vae|base|controlnet|lcm|... --config FILE [--resume] [--output DIR] [--max-steps N]``.

A thin shell over ``controlstack.training``: the YAML file becomes the recipe's typed config
(unknown keys and bad values raise ``ControlstackError`` -> one line, exit 2), ``--output`` and
``--max-steps`` override the file. Runs unchanged under ``accelerate launch -m
controlstack.cli.main train ...`` for multi-GPU / multi-node.
"""

from __future__ import annotations

import argparse

from controlstack.cli.text import plain
from controlstack.training import RECIPES, recipe


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model: VAE, base, ControlNet, Omni, predictor, IP-Adapter, LCM student, or an evaluation network (features, clip)",
                              description=plain(__doc__.splitlines()[0]))
    p.add_argument("recipe", choices=list(RECIPES), help="what to train")
    p.add_argument("--config", required=True, help="YAML config (see src/controlstack/configs/train/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output folder")
    p.add_argument("--output", default=None, help="output folder (overrides output_dir)")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides max_steps)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config_cls, train = recipe(args.recipe)
    config = config_cls.from_yaml(args.config, output_dir=args.output, max_steps=args.max_steps)
    out = train(config, resume=args.resume)
    print(f"model written to {out}")
    return 0
