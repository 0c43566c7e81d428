"""``controlstack convert SRC DST``: ControlNets (and SD bases) between diffusers folders and original
single files.

Without ``--to``, a ``.safetensors`` DST means the original single-file format and anything else a
diffusers folder. The output is written to a temporary sibling and renamed, so a failure leaves
nothing behind; an existing DST is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from controlstack.cli.text import plain
from controlstack.errors import ControlstackError
from controlstack.io.paths import output_file


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a ControlNet or SD checkpoint between formats",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="diffusers folder or single file (.safetensors; pickles need --allow-pickle)")
    p.add_argument("dst", metavar="DST", help="output: a folder (diffusers) or *.safetensors (original)")
    p.add_argument("--to", choices=("diffusers", "original"), help="output format (default: from DST's name)")
    p.add_argument("--config", metavar="DIR", help="config for a single-file SRC: a folder with config.json "
                   "(ControlNet) or a diffusers SD folder (base; also gives the tokenizer)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pth/.pt/.bin input (trusted files only)")
    p.add_argument("--half", action="store_true", help="store weights as float16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(func=run)


def output_format(dst: Path, to: str | None, overwrite: bool) -> str:
    """Validate DST before any work is done; return the format to write."""
    if dst.exists() and not overwrite:
        raise ControlstackError(f"'{dst}' already exists; pass --overwrite or choose another output path")
    to = to or ("original" if dst.suffix.lower() == ".safetensors" else "diffusers")
    if to == "original" and dst.suffix.lower() != ".safetensors":
        raise ControlstackError(f"the original format is one .safetensors file; name the output '{dst}.safetensors'")
    if to == "diffusers" and dst.suffix:
        raise ControlstackError(f"diffusers format is a folder; give an output path without a file extension, not '{dst}'")

    output_file(dst, "output") if to == "original" else output_file(dst / "config.json", "output")
    return to


def run(args) -> int:
    import torch  # local: keeps CLI start-up light

    from controlstack.io.checkpoints import (  # local: keeps CLI start-up light
        inspect_checkpoint,
        load_controlnet,
        save_base,
        save_controlnet,
    )
    from controlstack.io.sd_single_file import load_base  # local: keeps CLI start-up light

    dst = Path(args.dst)
    to = output_format(dst, args.to, args.overwrite)
    kind = inspect_checkpoint(args.src, allow_pickle=args.allow_pickle)["kind"]
    dtype = torch.float16 if args.half else None
    family = inspect_checkpoint(args.src, allow_pickle=args.allow_pickle).get("arch", {}).get("family_name")
    if family in ("sd3", "flux") and kind == "controlnet" and to != "diffusers":  # their makers ship diffusers folders
        raise ControlstackError(f"'{args.src}' is an SD3 / Flux ControlNet; they are kept as diffusers folders "
                                "(--to diffusers copies it); bases convert both ways")
    if kind == "controlnet":
        model = load_controlnet(args.src, allow_pickle=args.allow_pickle, config=args.config, torch_dtype=dtype)
        save_controlnet(model, dst, format=to)
    elif kind == "base":
        components = load_base(args.src, allow_pickle=args.allow_pickle, config=args.config, torch_dtype=dtype)
        save_base(components, dst, format=to)
    else:
        raise ControlstackError(f"'{args.src}' holds a {kind}; convert handles ControlNets and SD base models")
    print(f"wrote {dst} ({to} {kind})")
    return 0
