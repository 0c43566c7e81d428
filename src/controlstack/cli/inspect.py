"""``controlstack inspect PATH``: what a checkpoint is (format, kind, architecture, params, size, dtype).

Safetensors files are read header-only; pickles need ``--allow-pickle``.
"""

from __future__ import annotations

import json

from controlstack.cli.text import plain


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="describe a checkpoint (format, architecture, size, dtype)",
                              description=plain(__doc__))
    p.add_argument("path", metavar="PATH", help="diffusers folder or checkpoint file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle files (trusted files only)")
    p.set_defaults(func=run)


def _human(n: float, units=("B", "KB", "MB", "GB", "TB"), base=1024.0) -> str:
    for unit in units:
        if n < base or unit == units[-1]:
            return f"{n:.1f} {unit}" if unit != units[0] else f"{int(n)} {unit}"
        n /= base
    return str(n)


def run(args) -> int:
    from controlstack.io.checkpoints import inspect_checkpoint  # local: keeps CLI start-up light

    info = inspect_checkpoint(args.path, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(info))
        return 0
    arch = dict(info["arch"])
    print(f"path:    {info['path']}")
    print(f"format:  {info['format']} ({info['container']})")
    print(f"kind:    {info['kind']}, {arch.pop('family')}")
    print(f"params:  {info['params']:,} in {info['tensors']} tensors")
    print(f"size:    {_human(info['size_bytes'])}")
    print(f"dtype:   {info['dtype']}")
    print(f"arch:    ({arch.pop('config_source')})")
    for key, value in arch.items():
        print(f"  {key}: {value}")
    return 0
