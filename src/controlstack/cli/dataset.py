"""``controlstack dataset build PHOTOS --annotators canny,depth --out DIR``: a folder of photos -> a
``datasets`` folder (image, text, one column per annotator) the training recipes read.

Thin shell over :func:`controlstack.training.dataset_build.build_dataset`. Resumable after a kill
(run the same command again); ``--workers N`` local processes; under ``accelerate launch`` each rank
builds its share and rank 0 merges."""

from __future__ import annotations

import argparse

from controlstack.cli.text import int_flag as _int
from controlstack.io.paths import output_parent


def register(subparsers) -> None:
    parser = subparsers.add_parser("dataset", help="build a training dataset from your photos")
    sub = parser.add_subparsers(dest="dataset_command", metavar="ACTION")
    sub.required = True
    build = sub.add_parser(
        "build", help="photos + annotators -> a datasets folder (image, text, one column per annotator)",
        description="Annotate every photo of PHOTOS (recursively) with each annotator and save image, caption "
                    "and conditions with datasets' save_to_disk. Resumes after a kill; unreadable photos are "
                    "skipped and listed in DIR/skipped.txt.")
    build.add_argument("photos", metavar="PHOTOS", help="folder of images (png, jpg, webp, bmp)")
    build.add_argument("--annotators", required=True, metavar="A,B,...",
                       help="annotator names (controlstack annotate --help lists them), one column each")
    build.add_argument("--captions", default=None, metavar="CSV",
                       help="a CSV with columns file,text (paths relative to PHOTOS); without it a .txt beside "
                            "each photo is its caption, else the caption is empty")
    build.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or absent)")
    build.add_argument("--size", default="0", metavar="PX", help="resize each photo's shorter side to PX (0: keep)")
    build.add_argument("--workers", default="1", metavar="N", help="local worker processes (default 1)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from controlstack.training.dataset_build import build_dataset  # local: keeps CLI start-up light

    output_parent(args.out)
    names = [n.strip() for n in args.annotators.split(",") if n.strip()]
    out = build_dataset(args.photos, args.out, names, captions=args.captions, workers=_int("workers", args.workers),
                        size=_int("size", args.size), progress=not args.quiet)
    if out is not None:
        print(f"wrote {out} (see {out}/skipped.txt for photos that could not be read)")
    return 0
