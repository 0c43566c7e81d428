"""``controlstack asym --controlnet NAME_OR_PATH [--model BASE] [--data DIR] [--batch N] [--steps N] [--seed S]``.

Prints one line ``Asym=<value> NAsym=<value>``: the asymmetry of the part of the noise-prediction
Jacobian that the ControlNet adds (Minimal Impact ControlNet, Table 6), Hutchinson-estimated over
``steps`` batches of noisy latents (default: held-out world scenes). A thin shell over
``controlstack.evaluation.asym.measure_asym``.
"""

from __future__ import annotations

import argparse

from controlstack.cli.text import DefaultsFormatter, plain
from controlstack.evaluation import ASYM_BATCH, ASYM_STEPS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "asym", help="Jacobian asymmetry (Asym, NAsym) that a ControlNet adds to the base",
        description=plain(__doc__.splitlines()[0]), formatter_class=DefaultsFormatter)
    p.add_argument("--controlnet", required=True, help="a bundled ControlNet name (canny, mi-canny, ...) or a path")
    p.add_argument("--model", default=None, help="base model folder or file (default: the bundled model)")
    p.add_argument("--data", default=None,
                   help="datasets folder with image, text and the condition column (default: held-out world scenes)")
    p.add_argument("--condition", default=None,
                   help="the condition column the ControlNet reads (default: from its name or its settings file)")
    p.add_argument("--batch", type=int, default=ASYM_BATCH, help="samples per batch")
    p.add_argument("--steps", type=int, default=ASYM_STEPS, help="batches (one Rademacher probe per sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, timesteps and probes")
    p.add_argument("--mode", default=None,
                   help="injection the ControlNet is used with (default: its recommended mode, else sum)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from controlstack import Pipeline  # local: keeps CLI start-up light
    from controlstack.evaluation.asym import measure_asym  # local: keeps CLI start-up light

    pipe = Pipeline.from_pretrained(args.model)
    result = measure_asym(pipe, args.controlnet, condition=args.condition, data=args.data, batch=args.batch,
                          steps=args.steps, seed=args.seed, mode=args.mode)
    print(result.line())
    return 0
