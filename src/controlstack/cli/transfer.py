"""``controlstack transfer``: move a ControlNet to a fine-tuned base, ``cn' = cn + (base' - base)``.

The difference between the new and the old base is added to the ControlNet's copy of the U-Net
encoder (conv_in, time embedding, down blocks, mid block); the hint encoder and the zero
convolutions are kept (ControlNet paper, "transferring to community models").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from controlstack.cli.convert import output_format
from controlstack.cli.text import plain


def register(subparsers) -> None:
    p = subparsers.add_parser("transfer", help="transfer a ControlNet to a fine-tuned base model",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--controlnet", required=True, metavar="CN", help="ControlNet folder or single file")
    p.add_argument("--base", required=True, metavar="OLD", help="the base the ControlNet was trained on")
    p.add_argument("--new-base", required=True, metavar="NEW", help="the fine-tuned base to transfer to")
    p.add_argument("--out", required=True, metavar="DST", help="output: folder (diffusers) or *.safetensors (original)")
    p.add_argument("--config", metavar="DIR", help="config folder for a single-file ControlNet")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle inputs (trusted files only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def run(args) -> int:
    from controlstack.io.checkpoints import (  # local: keeps CLI start-up light
        load_controlnet,
        save_controlnet,
        transfer_controlnet,
    )
    from controlstack.io.sd_single_file import load_unet  # local: keeps CLI start-up light

    out = Path(args.out)
    to = output_format(out, None, args.overwrite)
    cn = load_controlnet(args.controlnet, allow_pickle=args.allow_pickle, config=args.config)
    old = load_unet(args.base, allow_pickle=args.allow_pickle)
    new = load_unet(args.new_base, allow_pickle=args.allow_pickle)
    save_controlnet(transfer_controlnet(cn, old, new), out, format=to)
    print(f"wrote {out} ({to} controlnet)")
    return 0
