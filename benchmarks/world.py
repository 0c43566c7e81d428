"""Scenes per second of the procedural world, all annotations on (issue 5 targets at 128 px:
render >= 100 scenes/s on this 2-core machine, full export >= 50 scenes/s end to end).

    .venv/bin/python benchmarks/world.py [--size 128] [--scenes 300] [--workers 2]

Prints, for one process: render only (``sample_scene`` + ``render``: image, depth, normals, seg,
instances, softedge, canny, scribble, pose, keypoints, caption) and render + PNG encoding; then
the whole ``export_dataset`` (pool of ``--workers`` processes, Arrow writing, save_to_disk) on
``--scenes`` scenes. Wall-clock numbers on a shared machine are depressed by other processes:
the load average and the CPU seconds per scene (``time.process_time``) are printed alongside.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from controlstack.world import WorldConfig, render, sample_scene
from controlstack.world.export import encode_row, export_dataset


def _per_process(fn, n: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - wall), (time.process_time() - cpu) / n * 1000


def _render_many(job: tuple[int, int, int]) -> None:
    size, seed, n = job
    config = WorldConfig(size=size)
    for i in range(n):
        render(sample_scene([seed, i], config), size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--scenes", type=int, default=300, help="scenes per measurement")
    parser.add_argument("--workers", type=int, default=2, help="export worker processes")
    args = parser.parse_args()
    config = WorldConfig(size=args.size)
    print(
        f"world benchmark: {args.size}x{args.size}, {args.scenes} scenes, load average "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other processes depress these numbers)"
    )

    # Warm the per-size caches (ray table, ground textures, sky gradients) like a long export does.
    for i in range(40):
        render(sample_scene([10**6, i], config), args.size)

    rate, cpu = _per_process(lambda i: render(sample_scene([1, i], config), args.size), args.scenes)
    print(f"render only        : {rate:7.1f} scenes/s  ({cpu:.1f} ms CPU/scene, one process)")
    rate, cpu = _per_process(
        lambda i: encode_row(render(sample_scene([2, i], config), args.size)), args.scenes
    )
    print(f"render + PNG encode: {rate:7.1f} scenes/s  ({cpu:.1f} ms CPU/scene, one process)")

    # The machine's render throughput: one process per core, each rendering its share.
    from multiprocessing import get_context

    with get_context("forkserver").Pool(args.workers) as pool:
        pool.map(_render_many, [(args.size, 5, 20)] * args.workers)  # start + warm the workers
        start = time.perf_counter()
        pool.map(_render_many, [(args.size, 6 + w, args.scenes // args.workers) for w in range(args.workers)])
        rate = (args.scenes // args.workers) * args.workers / (time.perf_counter() - start)
    print(f"render, {args.workers} processes: {rate:6.1f} scenes/s  (the machine's throughput, all annotations)")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_dataset(
            Path(tmp) / "ds", scenes=args.scenes, seed=3, config=config, workers=args.workers, progress=False
        )
        rate = args.scenes / (time.perf_counter() - start)
    print(
        f"export end to end  : {rate:7.1f} scenes/s  ({args.workers} workers, incl. pool start, "
        f"Arrow writing and save_to_disk)"
    )
    print(f"load average after : {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
