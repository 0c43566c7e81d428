"""``controlstack`` entry point: one sub-command per module, errors as one line + exit 2.

Each sub-command module exposes ``register(subparsers)`` which adds its parser and sets
``func=run`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
Modules are imported lazily so that ``controlstack --help`` stays fast and one broken optional
dependency cannot take the whole CLI down.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from controlstack.errors import ControlstackError

# Sub-command modules, in the order they appear in --help.
COMMANDS = (
    "generate",
    "convert",
    "transfer",
    "inspect",
    "annotate",
    "world",
    "dataset",
    "train",
    "asym",
    "evaluate",
    "serve",
    "worker",
    "demo",
)


def _version() -> str:
    try:
        return version("controlstack")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlstack", description="Spatial control for text-to-image diffusion."
    )
    parser.add_argument("--version", action="version", version=f"controlstack {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"controlstack.cli.{name}")
        except ModuleNotFoundError as exc:  # a sub-command not written yet
            if exc.name == f"controlstack.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="controlstack: %(message)s")
    try:
        code = args.func(args)
    except ControlstackError as exc:
        print(f"controlstack {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"controlstack {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: keep the traceback available, but only on request
        if os.environ.get("CONTROLSTACK_DEBUG"):
            raise
        print(
            f"controlstack {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(set CONTROLSTACK_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
