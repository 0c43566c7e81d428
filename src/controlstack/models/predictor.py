"""OmniControlNet's stage 1: one multi-task dense predictor that makes the conditions from a photo.

OmniControlNet (Wang et al. 2024, Sec. 3.1; docs/method.md §3): a Swin Transformer backbone gives
features at 1/4, 1/8, 1/16 and 1/32; each level is projected to a common width and refined by a
multi-head FPN (top-down pathway; one output head per level, all brought to 1/4 and
concatenated); a learned task embedding (one-hot task -> a vector over the concatenated
channels) multiplies those features channel-wise, and ONE decoder head turns the product into
the task's output. So the backbone, the FPN and the head are shared by every task and the only
per-task weights are one embedding row.

The head reads its output at 1/2 resolution, with a stride-2 stem of the image concatenated in
(edges and keypoints need detail the 1/4 features lack), and the outputs are upsampled
bilinearly to the input size. Its channels are shared: task ``t`` reads the first
``TASKS[t]`` of them:

* ``depth``: 1, sigmoid -> [0, 1], near = bright (the ControlNet depth convention, as the world's
  ``depth`` column);  ``hed``: 1, sigmoid -> soft edge probability;
* ``normal``: 3, a unit vector per pixel (x right, y up, z towards the camera: the world's
  ``normal`` column as RGB = (n + 1) / 2);  ``seg``: one logit per class of ``world.palette``;
* ``pose`` (OpenPose-18 people) / ``animal_pose`` (AP-10K's 17 points): one heatmap logit per
  keypoint, one for the instance centres and 2 offset channels (the vector from a keypoint's
  pixel to its instance's centre, in units of the image size) that group keypoints into instances
  (:func:`decode_keypoints`).

Randomly initialised (no downloads); ``transformers``' ``SwinBackbone`` needs no torchvision.
Weights: ``model.safetensors`` + ``config.json`` (:func:`save_predictor` / :func:`load_predictor`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from controlstack.errors import ControlstackError

N_CLASSES = 12  # world.palette.CLASSES (kept here: models/ does not import world/)
PEOPLE_POINTS, ANIMAL_POINTS = 18, 17
#: task -> output channels it reads (keypoint tasks: K heatmaps + centre + 2 offsets)
TASKS = {"depth": 1, "hed": 1, "normal": 3, "seg": N_CLASSES, "pose": PEOPLE_POINTS + 3,
         "animal_pose": ANIMAL_POINTS + 3}
KEYPOINTS = {"pose": PEOPLE_POINTS, "animal_pose": ANIMAL_POINTS}


@dataclass
class PredictorConfig:
    image_size: int = 128
    embed_dim: int = 32                                         # Swin: channels at 1/4 (doubling per level)
    depths: list[int] = field(default_factory=lambda: [1, 1, 2, 1])
    num_heads: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    window_size: int = 4
    fpn_width: int = 32                                         # the common width of every level
    head_width: int = 24                                        # decoder head channels
    stem_width: int = 8                                         # image stem at 1/2
    tasks: list[str] = field(default_factory=lambda: list(TASKS))

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ControlstackError(f"predictor tasks {unknown or '[]'} unknown; choose from {', '.join(TASKS)}")


class MultiTaskPredictor(nn.Module):
    def __init__(self, config: PredictorConfig):
        super().__init__()
        from transformers import SwinBackbone, SwinConfig  # local: heavy, only this path needs it

        self.config = config
        c = config
        # drop_path_rate 0: no stochastic depth (a 1.4M-parameter net does not need it, and its draws
        # from the global RNG would break exact resume)
        self.backbone = SwinBackbone(SwinConfig(
            image_size=c.image_size, patch_size=4, embed_dim=c.embed_dim, depths=list(c.depths),
            num_heads=list(c.num_heads), window_size=c.window_size, drop_path_rate=0.0,
            out_features=[f"stage{i + 1}" for i in range(len(c.depths))]))
        widths = [c.embed_dim * 2 ** i for i in range(len(c.depths))]
        self.lateral = nn.ModuleList(nn.Conv2d(w, c.fpn_width, 1) for w in widths)
        self.fpn_heads = nn.ModuleList(nn.Sequential(nn.Conv2d(c.fpn_width, c.fpn_width, 3, padding=1), nn.GELU())
                                       for _ in widths)
        concat = c.fpn_width * len(widths)
        self.task_embedding = nn.Embedding(len(c.tasks), concat)
        nn.init.ones_(self.task_embedding.weight)  # start as "every channel on"; training tells tasks apart
        self.stem = nn.Sequential(nn.Conv2d(3, c.stem_width, 3, stride=2, padding=1), nn.GELU())
        self.head = nn.Sequential(nn.Conv2d(concat, c.head_width, 1), nn.GELU())  # 1x1: runs once per task
        self.refine = nn.Sequential(nn.Conv2d(c.head_width + c.stem_width, c.head_width, 3, padding=1), nn.GELU(),
                                    nn.Conv2d(c.head_width, max(TASKS[t] for t in c.tasks), 1))
        self.task_index = {t: i for i, t in enumerate(c.tasks)}

    def features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared part, once per image: (concatenated FPN outputs at 1/4, image stem at 1/2)."""
        x = image * 2 - 1  # [0, 1] -> [-1, 1]
        levels = self.backbone(x).feature_maps
        lat = [proj(f) for proj, f in zip(self.lateral, levels)]
        for i in range(len(lat) - 2, -1, -1):  # top-down pathway
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        size = lat[0].shape[-2:]
        outs = [F.interpolate(h(f), size=size, mode="bilinear", align_corners=False) if i else h(f)
                for i, (h, f) in enumerate(zip(self.fpn_heads, lat))]
        return torch.cat(outs, 1), self.stem(x)

    def decode(self, feats: tuple[torch.Tensor, torch.Tensor], task: str, size) -> torch.Tensor:
        """The one decoder head for ``task``: raw outputs (logits) at ``size``, ``TASKS[task]`` channels."""
        if task not in self.task_index:
            raise ControlstackError(f"the predictor has no task '{task}'; it has {', '.join(self.task_index)}")
        fpn, stem = feats
        emb = self.task_embedding.weight[self.task_index[task]]
        h = self.head(fpn * emb[None, :, None, None])
        h = F.interpolate(h, size=stem.shape[-2:], mode="bilinear", align_corners=False)
        out = self.refine(torch.cat([h, stem], 1))[:, :TASKS[task]]
        size = tuple(size) if not isinstance(size, int) else (size, size)
        return out if size == tuple(out.shape[-2:]) else F.interpolate(out, size=size, mode="bilinear",
                                                                       align_corners=False)

    def forward(self, image: torch.Tensor, tasks=None, size=None) -> dict[str, torch.Tensor]:
        """``image`` (B, 3, H, W) in [0, 1] -> {task: raw output (B, C_task, size)}; one backbone pass
        for all ``tasks`` (default: every task). ``size`` default: the input's (training computes
        its losses at the head's own 1/2 resolution)."""
        feats = self.features(image)
        size = image.shape[-2:] if size is None else size
        return {t: self.decode(feats, t, size) for t in (tasks or self.config.tasks)}


# -- raw outputs -> conditions ---------------------------------------------------------------

def activate(task: str, raw: torch.Tensor) -> torch.Tensor:
    """Raw head output -> the task's values: depth / hed in [0, 1], unit normals, class
    probabilities, keypoint heatmaps in [0, 1] (offsets stay linear)."""
    if task in ("depth", "hed"):
        return torch.sigmoid(raw)
    if task == "normal":
        return F.normalize(raw, dim=1)
    if task == "seg":
        return raw.softmax(1)
    k = KEYPOINTS[task]
    return torch.cat([torch.sigmoid(raw[:, :k + 1]), raw[:, k + 1:]], 1)


def _peaks(heat: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Local maxima (3x3) above ``threshold``: (row, col, value), strongest first."""
    t = torch.from_numpy(heat)[None, None]
    is_max = (F.max_pool2d(t, 3, 1, 1) == t)[0, 0].numpy() & (heat > threshold)
    rows, cols = np.nonzero(is_max)
    return sorted(((int(r), int(c), float(heat[r, c])) for r, c in zip(rows, cols)), key=lambda p: -p[2])


def _subpixel(heat: np.ndarray, r: int, c: int) -> tuple[float, float]:
    """Peak position refined by a quarter pixel towards the higher neighbour (the classic
    heatmap trick), in pixel-centre coordinates (pixel j spans [j, j + 1))."""
    h, w = heat.shape
    dx = 0.25 * np.sign(heat[r, min(c + 1, w - 1)] - heat[r, max(c - 1, 0)])
    dy = 0.25 * np.sign(heat[min(r + 1, h - 1), c] - heat[max(r - 1, 0), c])
    return c + 0.5 + dx, r + 0.5 + dy


def decode_keypoints(values: np.ndarray, threshold: float = 0.25, center_threshold: float = 0.3,
                     reach: float = 0.15, min_confidence: float = 0.0) -> list[np.ndarray]:
    """Activated keypoint outputs ``(K + 3, H, W)`` -> instances, each ``(K, 3)``: x, y (pixels) and
    the heatmap score (0 = not found).

    Instances are the peaks of the centre map; every keypoint peak votes for the centre at
    ``its position + offset`` and joins the nearest detected centre if its vote lands within
    ``reach`` x the image size of it (one peak per keypoint type and instance, the strongest).
    Peaks that vote for no detected centre are dropped: on photographs far from the training data
    they would otherwise join into long spurious limbs.

    ``min_confidence``: instances whose centre peak -- the instance's detection score, as in
    CenterNet (Zhou et al. 2019, "Objects as Points") -- is below it are dropped *after* grouping,
    so the instances kept get the same keypoints as without it (``pose_estimate``'s gate)."""
    k = values.shape[0] - 3
    h, w = values.shape[1:]
    peaks = _peaks(values[k], center_threshold)
    centers = [(c + 0.5, r + 0.5) for r, c, _ in peaks]
    found = [(j, p) for j in range(k) for p in _peaks(values[j], threshold)]
    people = [np.zeros((k, 3)) for _ in centers]
    for j, (r, c, score) in found if centers else ():
        vx, vy = c + 0.5 + values[k + 1, r, c] * w, r + 0.5 + values[k + 2, r, c] * h
        d2 = [(vx - cx) ** 2 + (vy - cy) ** 2 for cx, cy in centers]
        i = int(np.argmin(d2))
        if d2[i] > (reach * max(h, w)) ** 2:
            continue
        if score > people[i][j, 2]:
            x, y = _subpixel(values[j], r, c)
            people[i][j] = (x, y, score)
    return [p for p, (_, _, score) in zip(people, peaks) if (p[:, 2] > 0).sum() >= 2 and score >= min_confidence]


def keypoint_targets(instances: list[np.ndarray], k: int, size: int, sigma: float = 1.0,
                     radius: float = 2.0) -> np.ndarray:
    """Training targets for one image's instances (each ``(K, 3)`` pixels + confidence; 0 = absent):
    ``(K + 5, H, W)`` = K Gaussian heatmaps, the centre heatmap, 2 offsets, and 2 masks (where the
    offsets are supervised; the last repeats it so the offsets' mask matches channel-wise)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    out = np.zeros((k + 5, size, size), np.float32)
    for inst in instances:
        present = inst[:, 2] > 0
        if not present.any():
            continue
        cx, cy = inst[present, 0].mean(), inst[present, 1].mean()
        out[k] = np.maximum(out[k], np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (2 * sigma) ** 2)))
        for j in np.flatnonzero(present):
            x, y = inst[j, :2]
            d2 = (xx - x) ** 2 + (yy - y) ** 2
            out[j] = np.maximum(out[j], np.exp(-d2 / (2 * sigma ** 2)))
            near = d2 <= radius ** 2
            out[k + 1][near] = (cx - xx[near]) / size
            out[k + 2][near] = (cy - yy[near]) / size
            out[k + 3][near] = out[k + 4][near] = 1.0
    return out


# -- storage ---------------------------------------------------------------------------------

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def save_predictor(model: MultiTaskPredictor, folder: str | Path, dtype=torch.float32) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps({"_class_name": "MultiTaskPredictor", **asdict(model.config)},
                                                 indent=2) + "\n")
    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()},
              str(folder / WEIGHTS_FILE))
    return folder


def load_predictor(folder: str | Path) -> MultiTaskPredictor:
    """A predictor folder (config.json + model.safetensors) -> the float32 model in eval mode."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ControlstackError(f"'{folder}' is not a predictor folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if cfg.pop("_class_name", None) != "MultiTaskPredictor":
        raise ControlstackError(f"'{folder}/{CONFIG_FILE}' does not describe a MultiTaskPredictor")
    try:
        model = MultiTaskPredictor(PredictorConfig(**cfg))
        model.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()})
    except (TypeError, RuntimeError) as exc:
        raise ControlstackError(f"cannot load the predictor in '{folder}' ({str(exc).splitlines()[0]})") from None
    return model.eval()


# -- inference: photo -> conditions (what the learned annotators call) ----------------------

_LOADED: dict[str, MultiTaskPredictor] = {}


def cached_predictor(folder: str | Path) -> MultiTaskPredictor:
    """:func:`load_predictor`, once per folder and process."""
    key = str(Path(folder).resolve())
    if key not in _LOADED:
        _LOADED[key] = load_predictor(folder)
    return _LOADED[key]


def run_size(width: int, height: int, native: int) -> tuple[int, int]:
    """The size the predictor runs at: short side ``native`` (the scale it was trained at: world
    scenes at 128 px), both sides multiples of 32 (the coarsest Swin level)."""
    s = native / min(width, height)
    return max(32, round(width * s / 32) * 32), max(32, round(height * s / 32) * 32)


@torch.no_grad()
def predict(model: MultiTaskPredictor, rgb: np.ndarray, tasks) -> dict[str, np.ndarray]:
    """RGB uint8 (H, W, 3) -> {task: activated output (C, H, W) float32 at the photo's size}; one
    backbone pass for all tasks."""
    h, w = rgb.shape[:2]
    rw, rh = run_size(w, h, model.config.image_size)
    small = np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.Resampling.BICUBIC), np.float32) / 255.0
    x = torch.from_numpy(small).permute(2, 0, 1)[None]
    raw = model(x, tasks, size=(rh // 2, rw // 2))
    out = {}
    for t, r in raw.items():
        v = activate(t, r)
        if t not in KEYPOINTS:  # dense maps come back at the photo's size; keypoints are decoded first
            v = F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False)
            v = F.normalize(v, dim=1) if t == "normal" else v
        out[t] = v[0].float().numpy()
    return out


def to_condition_array(task: str, values: np.ndarray) -> np.ndarray:
    """A dense task's activated output -> the ControlNet condition as uint8: depth / hed grey
    (near = bright), normal RGB = (n + 1) / 2 (seg: the caller colours the argmax classes)."""
    if task in ("depth", "hed"):
        return (values[0] * 255).round().clip(0, 255).astype(np.uint8)
    if task == "normal":
        return ((values.transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    raise ValueError(f"{task} is not a dense grey/RGB task")


#: (keypoint, centre) peak thresholds per task, chosen on 60 *training* scenes (rows 19000-19059) for
#: PCK@0.1 of the bundled predictor: people 0.231 at (0.25, 0.3), whatever the thresholds (0.22-0.23);
#: animals 0.064 at (0.1, 0.1) but 0.008 at (0.25, 0.3) -- its animal heatmaps peak lower
DECODE_THRESHOLDS = {"pose": (0.25, 0.3), "animal_pose": (0.1, 0.1)}


def keypoints_at(task: str, values: np.ndarray, width: int, height: int,
                 min_confidence: float = 0.0) -> list[np.ndarray]:
    """Decoded instances of a keypoint task (outputs at the head's resolution), in pixels of a
    ``width`` x ``height`` image; ``min_confidence``: see :func:`decode_keypoints` (0 keeps every
    instance, as the fidelity metrics measure)."""
    h, w = values.shape[1:]
    found = decode_keypoints(values, *DECODE_THRESHOLDS[task], min_confidence=min_confidence)
    return [p * [width / w, height / h, 1] for p in found]
