"""``controlstack world export``: render procedural scenes into a Hugging Face ``datasets`` folder.

Thin shell over :func:`controlstack.world.export.export_dataset`; numbers are parsed here (not by
argparse) so that a bad value is reported as one line with exit code 2.
"""

from __future__ import annotations

import argparse

from controlstack.cli.text import int_flag as _int
from controlstack.io.paths import output_parent


def register(subparsers) -> None:
    parser = subparsers.add_parser("world", help="the procedural world: export scenes as a dataset")
    sub = parser.add_subparsers(dest="world_command", metavar="ACTION")
    sub.required = True
    exp = sub.add_parser(
        "export",
        help="render N scenes with every condition into a datasets folder",
        description="Render N seeded scenes (image, text and every condition) and save them with "
        "datasets' save_to_disk. Row i is sample_scene([seed, i]).",
    )
    exp.add_argument("--scenes", required=True, metavar="N", help="number of scenes (rows)")
    exp.add_argument(
        "--size", default="128", metavar="PX", help="image side in pixels: 64, 128, 256, 512 ..."
    )
    exp.add_argument("--seed", default="0", metavar="S", help="dataset seed (>= 0)")
    exp.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or absent)")
    exp.add_argument("--workers", default="1", metavar="K", help="worker processes (default 1)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    exp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from controlstack.world.config import WorldConfig  # local: keeps CLI start-up light
    from controlstack.world.export import export_dataset  # local: keeps CLI start-up light

    config = WorldConfig(size=_int("size", args.size))
    output_parent(args.out)  # the export is written beside --out and renamed onto it
    out = export_dataset(
        args.out,
        scenes=_int("scenes", args.scenes),
        seed=_int("seed", args.seed),
        config=config,
        workers=_int("workers", args.workers),
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(f"wrote {args.scenes} scenes at {config.size}x{config.size} to {out}")
    return 0
