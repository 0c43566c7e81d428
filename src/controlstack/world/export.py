"""Export rendered scenes to a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``).

Row ``i`` of an export with seed ``S`` is ``render(sample_scene([S, i], config), size)``: rows do
not depend on the number of workers or the chunking, and two exports with different seeds share
no scenes. Columns, in order, are :data:`~controlstack.world.render.COLUMNS`; images are
``datasets.Image`` features stored as PNG bytes (RGB: image, normal, seg, pose; 8-bit grey:
depth, softedge, canny, scribble; ``instances``: 8-bit grey ids), ``text`` and ``keypoints`` are
strings. Load with ``datasets.load_from_disk(path)``.

Generation runs in a ``multiprocessing`` pool over chunks of consecutive indices (workers render
and PNG-encode, the parent only appends Arrow batches) behind a tqdm bar. Workers come from a
``forkserver`` (``spawn`` where there is none), so a script calling ``export_dataset(...,
workers=K > 1)`` needs the usual ``if __name__ == "__main__":`` guard. Everything is written
into a hidden sibling directory that is renamed onto ``out`` at the very end, so an interrupted
export never leaves a partial dataset at ``out``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from controlstack.errors import require
from controlstack.world.config import WorldConfig
from controlstack.world.render import COLUMNS, render
from controlstack.world.scene import sample_scene

TEXT_COLUMNS = ("text", "keypoints")
# zlib level 1 without PNG row filters: ~3x faster to write than OpenCV's default at 128 px and
# as small (these images are flat colours and thin lines, which filters do not help).
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
MAX_WORKERS = 64


def features():
    """The dataset's ``datasets.Features`` (column order = :data:`COLUMNS`)."""
    from datasets import Features, Image, Value  # local: heavy, only this path needs it

    return Features({c: Value("string") if c in TEXT_COLUMNS else Image() for c in COLUMNS})


def encode_png(array: np.ndarray) -> bytes:
    """uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB -> PNG bytes."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", array, PNG_PARAMS)
    if not ok:  # pragma: no cover - OpenCV failure is a bug, not a user error
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_row(row: dict) -> dict:
    """A rendered row -> a row of the dataset (PNG bytes for image columns)."""
    return {c: row[c] if c in TEXT_COLUMNS else {"bytes": encode_png(row[c]), "path": None} for c in COLUMNS}


def _render_chunk(job: tuple[int, int, int, dict]) -> list[dict]:
    seed, start, stop, cfg = job
    config = WorldConfig.from_dict(cfg)
    return [encode_row(render(sample_scene([seed, i], config), config.size)) for i in range(start, stop)]


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


def _pool(workers: int):
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:  # Windows, and macOS without forkserver: spawn
        ctx = multiprocessing.get_context("spawn")
    return ctx.Pool(workers, initializer=_init_worker)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        require(out.is_dir(), f"--out '{out}' is a file; pass a directory path")
        require(
            overwrite or not any(out.iterdir()),
            f"--out '{out}' is not empty; pass --overwrite to replace it or choose another directory",
        )


def export_dataset(
    out: str | os.PathLike,
    scenes: int,
    seed: int = 0,
    config: WorldConfig | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Render ``scenes`` scenes and save them as a ``datasets`` folder at ``out``; returns ``out``."""
    config = config or WorldConfig()
    for name, value, lo in (("scenes", scenes, 1), ("seed", seed, 0), ("workers", workers, 1)):
        require(
            isinstance(value, int) and not isinstance(value, bool) and value >= lo,
            f"--{name} must be an integer >= {lo}, got {value!r}",
        )
    require(workers <= MAX_WORKERS, f"--workers must be at most {MAX_WORKERS}, got {workers}")
    out = Path(out)
    _check_out(out, overwrite)
    from datasets import Dataset, DatasetInfo  # local: heavy, only this path needs it
    from datasets.arrow_writer import ArrowWriter  # local: heavy, only this path needs it

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        feats = features()
        chunk = max(1, min(64, math.ceil(scenes / (workers * 4))))
        jobs = [(seed, s, min(s + chunk, scenes), config.to_dict()) for s in range(0, scenes, chunk)]
        raw = tmp / "raw.arrow"
        # Start the pool before Arrow, tqdm or OpenCV spin up threads here: forking a process
        # with live threads can deadlock the children (seen with plain "fork" after rendering in
        # the parent). The forkserver is a fresh single-threaded process that imports this module
        # once and forks the workers from there.
        pool = _pool(workers) if workers > 1 else None
        writer = ArrowWriter(features=feats, path=str(raw))
        bar = tqdm(total=scenes, unit="scene", desc="world export", disable=not progress, file=sys.stderr)
        try:
            results = pool.imap(_render_chunk, jobs) if pool is not None else map(_render_chunk, jobs)
            for rows in results:
                writer.write_batch(feats.encode_batch({c: [r[c] for r in rows] for c in COLUMNS}))
                bar.update(len(rows))
            writer.finalize()
        finally:
            writer.close()
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        description = json.dumps(
            {
                "generator": "controlstack.world",
                "seed": seed,
                "scenes": scenes,
                "row_seed": "sample_scene([seed, row_index], config)",
                "config": config.to_dict(),
            }
        )
        ds = Dataset.from_file(str(raw), info=DatasetInfo(description=description, features=feats))
        final = tmp / "dataset"
        ds.save_to_disk(str(final))
        del ds
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["encode_png", "encode_row", "export_dataset", "features"]
