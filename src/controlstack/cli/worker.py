"""``controlstack worker --broker redis://HOST:6379/0 [--models DIR ...] [--concurrency 1]``: run the
jobs of ``controlstack serve --broker`` fronts (Celery over Redis; docs/serving.md, "Several machines").

Loads its bases now (the bundled ``default`` unless ``--no-default``, and ``--models``), announces
them in Redis, and takes jobs from their queues only, one at a time (a solo pool; ``--concurrency N``:
N threads). Stop it with Ctrl-C; a job it was running when killed runs again on another worker.
"""

from __future__ import annotations

import argparse

from controlstack.cli.serve import add_lora_dir, base_factories
from controlstack.cli.text import DefaultsFormatter, plain
from controlstack.errors import ControlstackError


def register(sub) -> None:
    p = sub.add_parser("worker", help="run jobs for `serve --broker` fronts (Celery + Redis)",
                       description=plain(__doc__), formatter_class=DefaultsFormatter)
    p.add_argument("--broker", required=True, metavar="URL", help="redis://HOST:6379/0, as the fronts'")
    p.add_argument("--models", nargs="+", default=[], metavar="DIR",
                   help="base models (SD folders or single files), named by file / folder name")
    p.add_argument("--no-default", action="store_true", help="do not hold the bundled 'default' base")
    p.add_argument("--controlnets", nargs="+", default=[], metavar="PATH",
                   help="ControlNets offered to every held base of their family")
    add_lora_dir(p)
    p.add_argument("--optimize", default="parity", choices=("parity", "compiled", "fast"),
                   help="speed tier of every model held (docs/speed.md)")
    p.add_argument("--concurrency", type=int, default=1, help="jobs at once (1: a solo pool)")
    p.add_argument("--job-seconds", type=float, default=600.0,
                   help="per-job time limit; give the fronts the same (it sets the redelivery time)")
    p.add_argument("--name", default=None, help="this worker's name (default: host-pid)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.broker.startswith(("redis://", "rediss://", "unix://")):
        raise ControlstackError(f"--broker must be a redis:// URL, got {args.broker[:80]!r}")
    if args.concurrency < 1:
        raise ControlstackError(f"--concurrency must be >= 1, got {args.concurrency}")
    if not args.job_seconds > 0:
        raise ControlstackError(f"--job-seconds must be > 0, got {args.job_seconds}")
    factories = base_factories(args, default=not args.no_default)
    if not factories:
        raise ControlstackError("no base to hold: give --models or drop --no-default")
    from controlstack.serve.distributed import start_worker  # local: keeps CLI start-up light

    start_worker(args.broker, factories, job_seconds=args.job_seconds, concurrency=args.concurrency,
                 name=args.name)
    return 0
