"""Milliseconds per 512x512 image for every classical annotator; optional side-by-side with controlnet_aux.

    .venv/bin/python benchmarks/annotators.py                  # our annotators
    .venv/bin/python benchmarks/annotators.py --with-aux       # + controlnet_aux's weight-free detectors
    .venv/bin/python benchmarks/annotators.py --figure docs/images/annotators.png

``--with-aux`` builds a throwaway virtual environment OUTSIDE the repository (default
/tmp/aux-venv) with ``pip install controlnet_aux`` (PyPI's default torch comes with it: several GB;
never the project's .venv), writes the same input to a temporary PNG, times the detectors that need
no weights there, and prints the ratio aux_ms / ours_ms (>= 1 means we are not slower).
Input: ``skimage.data.astronaut()`` (512x512). Timing: median of --repeat runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from controlstack import annotators

# ours -> (controlnet_aux class, call kwargs): the detectors that need no weights
AUX = {
    "canny": ("CannyDetector", {"low_threshold": 100, "high_threshold": 200}),
    "shuffle": ("ContentShuffleDetector", {}),
    "lineart": ("LineartStandardDetector", {}),
}

AUX_SCRIPT = r"""
import inspect, json, sys, time, statistics
import numpy as np
from PIL import Image
import controlnet_aux
img = Image.open(sys.argv[1]).convert("RGB")
repeat = int(sys.argv[2])
spec = json.loads(sys.argv[3])
out = {}
for ours, (cls_name, kw) in spec.items():
    cls = getattr(controlnet_aux, cls_name, None)
    if cls is None:
        continue
    det = cls()
    accepted = inspect.signature(det.__call__).parameters
    kw = {**{k: 512 for k in ("detect_resolution", "image_resolution") if k in accepted}, **kw}
    det(img, **kw)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        det(img, **kw)
        times.append((time.perf_counter() - t) * 1000)
    out[ours] = statistics.median(times)
print(json.dumps(out))
"""


def sample_inputs(photo: Image.Image) -> dict:
    """Per-annotator input and call arguments (label map for seg, depth for normal, JSON for pose)."""
    from skimage.segmentation import slic

    rgb = np.asarray(photo)
    labels = (slic(rgb, n_segments=60, start_label=0) % 150).astype(np.uint8)
    depth = np.asarray(photo.convert("L").filter(ImageFilter.GaussianBlur(6)))
    mask = np.zeros(rgb.shape[:2], np.float32)
    mask[300:470, 60:250] = 1.0
    return {"seg": (Image.fromarray(labels, "L"), {}), "normal": (Image.fromarray(depth, "L"), {}),
            "inpaint": (photo, {"mask": mask})}


def example_pose(tmp: Path) -> Path:
    """A hand-placed skeleton over the astronaut (for the figure and the pose timing)."""
    body = [[255, 175], [250, 285], [170, 290], [120, 400], [150, 500], [330, 285], [390, 390], [360, 480],
            [195, 500], [0, 0], [0, 0], [300, 500], [0, 0], [0, 0], [230, 150], [285, 150], [205, 165],
            [310, 165]]
    flat = [v for x, y in body for v in (float(x), float(y), 0.0 if x == 0 else 1.0)]
    path = tmp / "astronaut_pose.json"
    path.write_text(json.dumps({"people": [{"pose_keypoints_2d": flat}], "canvas_width": 512,
                                "canvas_height": 512}))
    return path


def time_ours(photo: Image.Image, repeat: int, tmp: Path) -> dict[str, float]:
    inputs = sample_inputs(photo)
    pose_json = example_pose(tmp)
    out = {}
    for name in annotators.available():
        if name in annotators.LEARNED:
            continue
        params = {"json": str(pose_json)} if name == "pose" else {}
        a = annotators.get(name, **params)
        image, kw = inputs.get(name, (photo, {}))
        a(image, **kw)  # warm-up (imports, caches)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            a(image, **kw)
            times.append((time.perf_counter() - t) * 1000)
        out[name] = statistics.median(times)
    return out


def time_aux(photo: Image.Image, repeat: int, venv: Path) -> dict[str, float]:
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"building {venv} (controlnet_aux + PyPI's default torch; this downloads several GB)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "controlnet_aux"], check=True)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "input.png"
        photo.save(path)
        spec = json.dumps({k: v for k, v in AUX.items()})
        r = subprocess.run([str(py), "-c", AUX_SCRIPT, str(path), str(repeat), spec], capture_output=True,
                           text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"controlnet_aux timing failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def figure(photo: Image.Image, path: Path, tmp: Path, tile: int = 224) -> None:
    """One PNG grid: the photograph and every classical annotator applied to it."""
    from PIL import ImageDraw

    inputs = sample_inputs(photo)
    pose_json = example_pose(tmp)
    names = [n for n in annotators.available() if n not in annotators.LEARNED]
    captions = {"normal": "normal (blurred luma as depth)", "seg": "seg (SLIC labels)",
                "pose": "pose (example JSON)", "inpaint": "inpaint (masked box)",
                "tile": "tile (down_sampling_rate=8)"}
    figure_params = {"tile": {"down_sampling_rate": 8.0}, "pose": {"json": str(pose_json)}}
    cells = [("photo (skimage astronaut)", photo)]
    for name in names:
        params = figure_params.get(name, {})
        image, kw = inputs.get(name, (photo, {}))
        cells.append((captions.get(name, name), annotators.get(name, **params)(image, **kw)))
    cols = 5
    rows = -(-len(cells) // cols)
    pad = 18
    grid = Image.new("RGB", (cols * tile, rows * (tile + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (caption, img) in enumerate(cells):
        x, y = (i % cols) * tile, (i // cols) * (tile + pad)
        grid.paste(img.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS), (x, y + pad))
        draw.text((x + 4, y + 3), caption, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--with-aux", action="store_true", help="also time controlnet_aux in a throwaway venv")
    ap.add_argument("--aux-venv", default="/tmp/aux-venv")
    ap.add_argument("--figure", metavar="PNG", help="write the annotator grid figure instead of timing")
    args = ap.parse_args()
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    with tempfile.TemporaryDirectory() as d:
        if args.figure:
            figure(photo, Path(args.figure), Path(d))
            return
        ours = time_ours(photo, args.repeat, Path(d))
    aux = time_aux(photo, args.repeat, Path(args.aux_venv)) if args.with_aux else {}
    print(f"{'annotator':<10} {'ms/img':>8}" + (f" {'aux ms':>8} {'aux/ours':>9}" if aux else ""))
    for name, ms in ours.items():
        line = f"{name:<10} {ms:8.1f}"
        if name in aux:
            line += f" {aux[name]:8.1f} {aux[name] / ms:9.2f}"
        print(line)


if __name__ == "__main__":
    main()
