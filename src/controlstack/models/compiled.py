"""The ``compiled`` and ``fast`` tiers' graph compiler: AOTInductor packages cached on disk.

Each model the loop calls per step -- the U-Net's two halves (:class:`~controlstack.models.runner.
UNetRunner` ``encode`` / ``decode``), every ControlNet branch (:class:`ControlNetRunner`) -- and the
VAE decoder is exported (``torch.export``) with static shapes and compiled ahead of time by
TorchInductor into a ``.pt2`` package: fused GroupNorm/SiLU/attention glue, weights frozen and
pre-packed for oneDNN. The package is written once under :func:`cache_dir` and loaded in ~1 s by
the next process; its name is a digest of everything that could change the code it holds: the
weights, the input shapes and dtypes, the precision, the torch / diffusers versions, the source of
the graph functions and runners (:mod:`~controlstack.models.graphs`), and the CPU's instruction
set (the kernels are built for the host ISA).

Why AOTInductor and nothing else (docs/speed.md, measured on the bench U-Net + ControlNet step,
2 threads, Intel Xeon with AMX): 1.56x eager at 128 px and 1.57x at 256 px, where OpenVINO (fp32
forced) gave 1.91x / 1.21x and ONNX Runtime 1.68x / 1.22x, and at 512 px every compiler was
at 0.85-0.95x (scaled-dot-product attention over 4096 tokens is 62% of the step and runs in the
same flash kernel either way). OpenVINO's small lead at 128 px did not survive a same-process
comparison (69 vs 64 ms), so neither extra dependency is kept.

A graph that cannot be built (no C++ compiler, an export error) runs eagerly instead, and the
first such failure is logged once.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from controlstack.models import graphs, runner, token_downsampling  # what the compiled code comes from

log = logging.getLogger("controlstack")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: bumped when a change here alters compiled graphs in a way the source digest would not show
FORMAT = 1


def cache_dir() -> Path:
    """``$CONTROLSTACK_CACHE/compiled``, else ``$XDG_CACHE_HOME/controlstack/compiled``, else
    ``~/.cache/controlstack/compiled``."""
    root = os.environ.get("CONTROLSTACK_CACHE")
    if root:
        return Path(root) / "compiled"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "controlstack" / "compiled"


def weights_digest(module: torch.nn.Module) -> str:
    """blake2b of every parameter and buffer (names, dtypes, shapes and bytes) and the config."""
    h = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in dict(getattr(module, "config", {})).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode() + type(module).__name__.encode())
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        t = t.detach().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _machine() -> str:
    """What the generated kernels depend on: the ISA (CPU flags) and the compiler's target."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


@functools.cache
def _environment() -> str:
    import diffusers  # local: heavy, only this path needs it

    sources = "".join(Path(m.__file__).read_text() for m in (graphs, runner, token_downsampling) if m.__file__) + Path(__file__).read_text()
    return "|".join([str(FORMAT), torch.__version__, diffusers.__version__, _machine(),
                     hashlib.sha256(sources.encode()).hexdigest()])


def signature(args: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(a.shape), str(a.dtype)) for a in args)


def cache_key(kind: str, weights: str, args: tuple[torch.Tensor, ...], precision: str) -> str:
    """The package's file name: changes with the weights, shapes, precision, versions and machine."""
    text = "|".join([kind, weights, repr(signature(args)), precision, _environment()])
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


class Graph(torch.nn.Module):
    """A tensors-in, tuple-of-tensors-out view of ``fn`` over ``module``'s weights, run in
    ``dtype``: float inputs are cast to it and float outputs back to float32, inside the graph.
    Inputs at the positions in ``exact`` stay float32: a timestep (bf16 rounds 999 to 1000) or
    SDXL's size ids, which the model embeds sinusoidally in float32 itself."""

    def __init__(self, module: torch.nn.Module, fn, dtype: torch.dtype, exact: tuple[int, ...] = ()):
        super().__init__()
        self.module, self.fn, self.dtype, self.exact = module, fn, dtype, exact

    def forward(self, *args):
        args = [a.to(self.dtype) if a.is_floating_point() and i not in self.exact else a for i, a in enumerate(args)]
        out = self.fn(self.module, *args)
        return tuple(o.float() if o.is_floating_point() else o for o in out)


class CompiledGraph:
    """``fn(module, *tensors) -> tuple of tensors`` compiled per input signature, loaded from the
    disk cache when it is there. Calling it with new shapes compiles (or loads) another package."""

    def __init__(self, kind: str, label: str, module: torch.nn.Module, fn, precision: str = "fp32",
                 same_weights_as: CompiledGraph | None = None, exact: tuple[int, ...] = ()):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        self.kind, self.label, self.fn, self.precision, self.exact = kind, label, fn, precision, exact
        self.module = module
        self._weights: str | None = None
        self._same = same_weights_as  # the U-Net's two halves hash its weights once (~3 s for SD-1.5)
        self._loaded: dict[tuple, object] = {}
        self.failed: str | None = None  # why this graph runs eagerly (once it could not be built)
        self.seconds: dict[str, float] = {"compile": 0.0, "load": 0.0}

    @property
    def weights(self) -> str:
        if self._weights is None:
            self._weights = self._same.weights if self._same is not None else weights_digest(self.module)
        return self._weights

    def eager(self, *args):
        return tuple(self.fn(self.module, *args))

    def __call__(self, *args):
        if self.failed:
            return self.eager(*args)
        sig = signature(args)
        runner = self._loaded.get(sig)
        if runner is None:
            try:
                runner = self._loaded[sig] = self._build(args)
            except Exception as e:  # noqa: BLE001 -- any compiler failure degrades to eager, said once
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                log.warning(f"compiled tier: the {self.label} could not be compiled ({self.failed}); it runs eagerly")
                return self.eager(*args)
        out = runner(*args)
        return tuple(out)

    def _build(self, args):
        path = cache_dir() / f"{cache_key(self.kind, self.weights, args, self.precision)}.pt2"
        if not path.exists():
            self._compile(args, path)
        t = time.perf_counter()
        loaded = torch._inductor.aoti_load_package(str(path))
        self.seconds["load"] += time.perf_counter() - t
        return loaded

    def _compile(self, args, path: Path) -> None:
        import torch._inductor.config as inductor_config  # local: heavy, only this path needs it

        dtype = PRECISIONS[self.precision]
        module = self.module
        if dtype != torch.float32:  # a bf16 copy; diffusers' warning about fp32-kept modules lists none here
            module = copy.deepcopy(module)
            for t in list(module.parameters()) + list(module.buffers()):
                t.data = t.data.to(dtype) if t.is_floating_point() else t.data
        graph = Graph(module, self.fn, dtype, self.exact).eval()
        shape = "x".join(map(str, args[0].shape))
        log.warning(f"compiling the {self.label} for {shape} input ({self.precision}); once per machine and "
                    f"size, cached in {path.parent}")
        t = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
        with torch.no_grad(), inductor_config.patch(freezing=True):
            exported = torch.export.export(graph, tuple(args), strict=False)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp))
        os.replace(tmp, path)  # atomic: a second process never loads a half-written package
        self.seconds["compile"] += time.perf_counter() - t
        log.warning(f"compiled the {self.label} in {time.perf_counter() - t:.0f} s")
