"""``controlstack serve [--host 127.0.0.1] [--port 7860] [--token T]``: the HTTP API (FastAPI + uvicorn).

sd-webui's API subset (``/sdapi/v1/txt2img``, ``/sdapi/v1/img2img`` with ControlNet units,
``/controlnet/...``) and the project's ``/v1``. Binds to loopback by default; any other address
requires ``--token`` (clients send ``Authorization: Bearer T``). ``/v1`` jobs and their PNGs are
kept in ``--data DIR`` (a SQLite database, a blobs and a results folder): finished jobs are served
after a restart, jobs left queued or running run again (docs/serving.md, "Jobs survive restarts").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from controlstack.cli.text import DefaultsFormatter, plain
from controlstack.errors import ControlstackError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API (sd-webui compatible)", description=plain(__doc__),
                       formatter_class=DefaultsFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=7860, help="port")
    p.add_argument("--token", default=None, help="Bearer token clients must send (required off loopback)")
    p.add_argument("--queue", type=int, default=4, help="jobs that may wait; more get 429 with Retry-After")
    p.add_argument("--no-ui", action="store_true", help="the API only, without the web UI at /")
    p.add_argument("--models", nargs="+", default=[], metavar="DIR",
                   help="more base models (SD folders or single files), registered by file / folder name beside "
                        "the bundled 'default'; clients pick one by name")
    p.add_argument("--controlnets", nargs="+", default=[], metavar="PATH",
                   help="ControlNets (folders or single files) offered by file / folder name to every served base "
                        "of their family (SD-1.x ones to SD-1.x bases, SDXL ones to SDXL bases)")
    add_lora_dir(p)
    p.add_argument("--memory", type=float, default=8.0, help="GiB of weights kept loaded (least recently used "
                                                            "bases are unloaded past it)")
    p.add_argument("--optimize", default="parity", choices=("parity", "compiled", "fast"),
                   help="speed tier of every model served (docs/speed.md)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="the job store: jobs.sqlite3, blobs/, results/ (default: $XDG_DATA_HOME/controlstack/serve, "
                        "else ~/.local/share/controlstack/serve)")
    p.add_argument("--keep-jobs", type=int, default=1000, metavar="N",
                   help="finished jobs kept with their PNGs (older ones are deleted; queued / running never)")
    p.add_argument("--keep-days", type=float, default=30.0, metavar="D",
                   help="finished jobs older than this many days are deleted with their PNGs")
    p.add_argument("--broker", default=None, metavar="URL",
                   help="redis://HOST:6379/0: a front only (no model loaded); jobs run on `controlstack worker` "
                        "processes (docs/serving.md, \"Several machines\")")
    p.add_argument("--job-seconds", type=float, default=600.0, help="with --broker: the per-job time limit the "
                                                                     "workers use too (sets the redelivery time)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.host not in LOOPBACK and not args.token:
        raise ControlstackError(f"--host {args.host} is reachable from other machines; set --token T (clients send "
                                "'Authorization: Bearer T')")
    if not 0 < args.port < 65536:
        raise ControlstackError(f"--port must be in 1-65535, got {args.port}")
    if args.queue < 0:
        raise ControlstackError(f"--queue must be >= 0, got {args.queue}")
    try:
        import uvicorn  # local: optional dependency
    except ImportError:
        raise ControlstackError("serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    if args.broker:  # a front of workers (serve/distributed.py): validates and queues, loads nothing
        from controlstack.serve.distributed import Cluster  # local: keeps CLI start-up light
        from controlstack.serve.front import create_front_app  # local: keeps CLI start-up light

        if not args.broker.startswith(("redis://", "rediss://", "unix://")):
            raise ControlstackError(f"--broker must be a redis:// URL, got {args.broker[:80]!r}")
        if not args.job_seconds > 0:  # NaN too
            raise ControlstackError(f"--job-seconds must be > 0, got {args.job_seconds}")
        cluster = Cluster(args.broker, args.queue, args.job_seconds, args.keep_days)
        uvicorn.run(create_front_app(cluster, token=args.token, ui=not args.no_ui, lora_dir=args.lora_dir),
                    host=args.host, port=args.port, log_level="info")
        return 0

    from controlstack.serve.app import create_app  # local: keeps CLI start-up light

    factories = base_factories(args, default=True)
    if args.memory <= 0:
        raise ControlstackError(f"--memory must be > 0 GiB, got {args.memory}")
    if args.keep_jobs < 0:
        raise ControlstackError(f"--keep-jobs must be >= 0, got {args.keep_jobs}")
    if not args.keep_days >= 0:  # NaN too
        raise ControlstackError(f"--keep-days must be >= 0, got {args.keep_days}")
    from controlstack.serve.store import default_data_dir  # local: keeps CLI start-up light

    app = create_app(factories, token=args.token, queue_size=args.queue, ui=not args.no_ui, memory_gib=args.memory,
                     data=args.data or default_data_dir(), keep_jobs=args.keep_jobs, keep_days=args.keep_days,
                     lora_dir=args.lora_dir)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def controlnet_families(paths: list[str]) -> dict[str, tuple[str, str]]:
    """name (file / folder stem) -> (path, family) of each ``--controlnets`` entry, read from its
    header (nothing is loaded until a request uses it)."""
    from controlstack.io.checkpoints import inspect_checkpoint  # local: keeps CLI start-up light

    out: dict[str, tuple[str, str]] = {}
    for p in paths:
        name = Path(p).stem
        if name in out:
            raise ControlstackError(f"--controlnets: two ControlNets named '{name}'; rename one folder or file")
        info = inspect_checkpoint(p)
        if info["kind"] not in ("controlnet", "t2i-adapter"):  # an adapter is a control model too
            raise ControlstackError(f"--controlnets: '{p}' is a {info['kind']}, not a ControlNet or T2I-Adapter")
        out[name] = (p, info["arch"]["family_name"])
    return out


def with_controlnets(pipe, controlnets: dict[str, tuple[str, str]]):
    """``pipe`` with the ControlNets of its family added (lazily loaded, in the base's dtype)."""
    from controlstack.io.checkpoints import load_controlnet  # local: keeps CLI start-up light

    for name, (path, family) in controlnets.items():
        if family == pipe.family.name:
            pipe.controlnets[name] = lambda path=path: load_controlnet(path, torch_dtype=pipe.unet.dtype)
    return pipe


def add_lora_dir(p) -> None:
    """The adapters a server or worker offers: LoRAs by prompt syntax, IP-Adapters by unit."""
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="LoRA files a prompt's <lora:NAME:WEIGHT> may name (listed at /sdapi/v1/loras)")
    p.add_argument("--ip-adapters", nargs="+", default=[], metavar="FILE",
                   help="IP-Adapters loaded into every base, named by file stem: an sd-webui unit with an "
                        "ip-adapter_* module and one of them as model is an image prompt")
    p.add_argument("--image-encoder", default=None, metavar="DIR",
                   help="with --ip-adapters: their CLIP image encoder (a CLIPVisionModelWithProjection folder)")


def base_factories(args, default: bool) -> dict:
    """``{name: loader}`` of the bases a server or worker holds: the bundled one as ``default`` (when
    ``default``), and each ``--models`` folder / file by its name, each with the ``--controlnets`` of
    its family and the ``--optimize`` tier; names are checked now, the weights read on first use."""
    from controlstack import Pipeline  # local: keeps CLI start-up light

    controlnets = controlnet_families(args.controlnets)

    lora_dir = getattr(args, "lora_dir", None)
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise ControlstackError(f"--lora-dir '{lora_dir}' is not a folder")

    ip_adapters = getattr(args, "ip_adapters", [])
    if ip_adapters and getattr(args, "image_encoder", None) is None:
        raise ControlstackError("--ip-adapters needs --image-encoder DIR (their CLIP image encoder)")
    for f in ip_adapters:
        if not Path(f).is_file():
            raise ControlstackError(f"--ip-adapters: '{f}' does not exist")

    def load(path=None):
        pipe = with_controlnets(Pipeline.from_pretrained(path), controlnets)
        for i, f in enumerate(ip_adapters):
            pipe.load_ip_adapter(f, image_encoder=args.image_encoder if i == 0 else None)
        pipe.optimize(args.optimize)
        pipe.lora_dir = lora_dir
        return pipe

    factories = {"default": load} if default else {}
    for d in args.models:
        name = Path(d).stem
        if not Path(d).exists():
            raise ControlstackError(f"--models: '{d}' does not exist")
        if name in factories:
            raise ControlstackError(f"--models: two models named '{name}'; rename one folder or file")
        factories[name] = (lambda d=d: load(d))
    return factories
