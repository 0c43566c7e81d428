"""Recipe: train OmniControlNet's multi-task dense predictor on the world's exact ground truth.

OmniControlNet (Wang et al. 2024, Sec. 3.1): one network (``models/predictor.py``) for depth,
soft edges (HED), normals, segmentation, human and animal pose. Every step runs the shared
backbone + FPN once on the batch and the one decoder head once per task (its task embedding
multiplying the features), and sums the tasks' losses:

* depth: L1 on [0, 1] (near = bright); normal: 1 - cos between unit vectors;
* hed: HED's class-balanced cross-entropy (Xie & Tu 2015, eq. 2: positives weighted by the share
  of negatives, so thin edges are not drowned by background);
* seg: cross-entropy over the palette's classes;
* pose / animal_pose: cross-entropy against Gaussian keypoint and centre heatmaps (σ 1.5 px, peaks
  weighted 1 + 20·target), L1 on the centre offsets near each keypoint.

A run with ``tasks: [depth]`` is the single-task predictor of the same backbone that docs/omni.md
compares against (the same number of steps per task). Same session machinery as the other recipes:
progress, metrics.csv (a loss per task), validation grids, exact resume, ``accelerate``.
Output: ``<output_dir>/model`` (config.json + model.safetensors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from controlstack import assets
from controlstack.annotators.base import to_condition
from controlstack.errors import require
from controlstack.io.png import make_grid
from controlstack.models.predictor import (
    KEYPOINTS,
    TASKS,
    MultiTaskPredictor,
    PredictorConfig,
    activate,
    keypoint_targets,
    save_predictor,
)
from controlstack.training.config import TrainConfig, list_field
from controlstack.training.data import (
    batches,
    first_rows,
    image_to_tensor,
    load_image_dataset,
    make_dataloader,
)
from controlstack.training.session import TrainingSession, make_lr_scheduler, make_optimizer

#: the batch's name -> the world export's column
COLUMNS = {"image": "image", "depth": "depth", "hed": "softedge", "normal": "normal", "seg": "seg",
           "keypoints": "keypoints"}
NEEDS = {"depth": "depth", "hed": "hed", "normal": "normal", "seg": "seg", "pose": "keypoints",
         "animal_pose": "keypoints"}


@dataclass
class PredictorTrainConfig(TrainConfig):
    tasks: tuple[str, ...] = list_field(*TASKS)  # one model for these; one task = a specialist
    embed_dim: int = 32                          # Swin widths: embed_dim * 2^level
    depths: tuple[int, ...] = list_field(1, 1, 2, 1)
    num_heads: tuple[int, ...] = list_field(1, 2, 4, 8)
    window_size: int = 4
    fpn_width: int = 32
    head_width: int = 24
    stem_width: int = 8
    learning_rate: float = 1e-3
    num_validation_images: int = 6
    output_dir: str = "outputs/train/predictor"

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [t for t in self.tasks if t not in TASKS]
        require(self.tasks and not unknown,
                f"config key 'tasks' has unknown {unknown or 'nothing'}; choose from {', '.join(TASKS)}")
        require(len(self.depths) == len(self.num_heads) >= 2,
                "config keys 'depths' and 'num_heads' need one entry per Swin stage (>= 2)")
        require(self.resolution % (4 * 2 ** (len(self.depths) - 1)) == 0,
                f"config key 'resolution' must be divisible by {4 * 2 ** (len(self.depths) - 1)} (the coarsest level)")

    def model_config(self) -> PredictorConfig:
        return PredictorConfig(image_size=self.resolution, embed_dim=self.embed_dim, depths=list(self.depths),
                               num_heads=list(self.num_heads), window_size=self.window_size,
                               fpn_width=self.fpn_width, head_width=self.head_width, stem_width=self.stem_width,
                               tasks=list(self.tasks))


def seg_to_classes(seg: np.ndarray) -> np.ndarray:
    """The world's seg colours (palette) -> class ids (H, W); unknown colours -> the nearest."""
    from controlstack.world.palette import PALETTE  # local: heavy, only this path needs it

    # exact palette colours by a packed-RGB lookup (the export's maps are lossless PNGs); only the
    # colours the palette lacks go through the nearest-colour search
    pal = PALETTE.astype(np.int64)
    keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    packed = (seg[..., 0].astype(np.int64) << 16) | (seg[..., 1].astype(np.int64) << 8) | seg[..., 2]
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys[order], packed), 0, len(keys) - 1)
    ids = order[pos]
    odd = keys[ids] != packed
    if odd.any():
        d = ((seg[odd][:, None, :].astype(np.int64) - pal[None]) ** 2).sum(-1)
        ids[odd] = d.argmin(-1)
    return ids.astype(np.int64)


def instances(keypoints_json: str, task: str) -> list[np.ndarray]:
    """The world's keypoints JSON -> (K, 3) arrays (pixels, 0 = absent) of people or animals."""
    data = json.loads(keypoints_json)
    if task == "pose":
        return [np.asarray(p["pose_keypoints_2d"], np.float32).reshape(-1, 3) for p in data.get("people", [])]
    return [np.asarray(a["keypoints"], np.float32).reshape(-1, 3) for a in data.get("animals", [])]


class PredictorRows:
    """``Dataset.with_transform`` callable: a row -> the predictor's input (at ``resolution``) and
    targets at the head's output resolution, half of it (picklable)."""

    def __init__(self, resolution: int, tasks):
        self.resolution, self.tasks = resolution, tuple(tasks)

    def __call__(self, batch: dict) -> dict:
        r = self.resolution // 2
        out: dict = {"image": [image_to_tensor(im, self.resolution, False) for im in batch["image"]]}
        need = {NEEDS[t] for t in self.tasks}
        if "depth" in need:
            out["depth"] = [image_to_tensor(im, r, False)[:1] for im in batch["depth"]]
        if "hed" in need:
            out["hed"] = [image_to_tensor(im, r, False)[:1] for im in batch["hed"]]
        if "normal" in need:
            out["normal"] = [F.normalize(image_to_tensor(im, r, False) * 2 - 1, dim=0) for im in batch["normal"]]
        if "seg" in need:
            out["seg"] = [torch.from_numpy(seg_to_classes(np.asarray(im.convert("RGB"))[::2, ::2]))
                          for im in batch["seg"]]
        for task in ("pose", "animal_pose"):
            if task in self.tasks:
                out[task] = [torch.from_numpy(keypoint_targets([i * [0.5, 0.5, 1] for i in instances(k, task)],
                                                                KEYPOINTS[task], r)) for k in batch["keypoints"]]
        return out


def task_loss(task: str, raw: torch.Tensor, batch: dict) -> torch.Tensor:
    """One task's loss on raw head outputs (see the module docstring)."""
    if task == "depth":
        return (torch.sigmoid(raw) - batch["depth"]).abs().mean()
    if task == "hed":
        y = batch["hed"]
        beta = 1 - y.mean(dim=(1, 2, 3), keepdim=True)  # share of negatives, per image
        w = y * beta + (1 - y) * (1 - beta)
        return 2 * F.binary_cross_entropy_with_logits(raw, y, weight=w)
    if task == "normal":
        return (1 - (F.normalize(raw, dim=1) * batch["normal"]).sum(1)).mean()
    if task == "seg":
        return F.cross_entropy(raw, batch["seg"])
    k = KEYPOINTS[task]
    target = batch[task]
    heat = target[:, :k + 1]
    bce = F.binary_cross_entropy_with_logits(raw[:, :k + 1], heat, weight=1 + 20 * heat)
    mask = target[:, k + 3:]
    offset = ((raw[:, k + 1:] - target[:, k + 1:k + 3]).abs() * mask).sum() / mask.sum().clamp(min=1)
    return bce * 10 + offset * 10


def train(config: PredictorTrainConfig, resume: bool = False):
    """Train and export the predictor; returns the path of the exported model folder."""
    session = TrainingSession(config, "predictor", resume)
    acc = session.accelerator
    tasks = tuple(config.tasks)
    needed = {"image"} | {NEEDS[t] for t in tasks}
    columns = {COLUMNS[n]: n for n in COLUMNS if n in needed}
    dataset = load_image_dataset(config.data, columns)
    val_set = load_image_dataset(config.validation_data, columns) if config.validation_data else dataset
    transform = PredictorRows(config.resolution, tasks)
    loader = make_dataloader(dataset, transform, config.batch_size, config.num_workers)
    val = first_rows(val_set, config.num_validation_images, transform)

    torch.manual_seed(config.seed)  # the random initialisation (no pretrained weights anywhere)
    model = MultiTaskPredictor(config.model_config())
    optimizer = make_optimizer(model.parameters(), config)
    lr_scheduler = make_lr_scheduler(optimizer, config, acc.num_processes)
    model, optimizer, loader, lr_scheduler = acc.prepare(model, optimizer, loader, lr_scheduler)
    session.restore()

    bar = session.progress()
    for batch in batches(acc, loader, session.micro) if not session.done else ():
        with acc.accumulate(model), acc.autocast():
            raw = model(batch["image"], tasks, size=batch["image"].shape[-1] // 2)  # the head's own resolution
            losses = {t: task_loss(t, raw[t].float(), batch) for t in tasks}
            loss = sum(losses.values())
            session.log_extra(**{f"loss_{t}": float(v.detach()) for t, v in losses.items()})
            session.optimize(model, loss, optimizer, lr_scheduler)
        if not acc.sync_gradients:
            continue
        session.end_step(bar, lr_scheduler)
        if session.should_validate() and session.is_main:
            validate(session, acc.unwrap_model(model), val)
        if session.done:
            break
    bar.close()
    net = acc.unwrap_model(model).eval()
    return session.export(lambda d: save_predictor(net, d))


@torch.no_grad()
def validate(session: TrainingSession, model: MultiTaskPredictor, val: dict) -> None:
    """``samples/step-N.png``: per row the photo, then for every task prediction | ground truth."""
    from controlstack.training.validation import tensor_to_pil  # local: heavy, only this path needs it

    model.eval()
    tasks = tuple(session.config.tasks)
    out = {t: activate(t, v) for t, v in model(val["image"], tasks, size=val["image"].shape[-1] // 2).items()}
    images = tensor_to_pil(val["image"], signed=False)
    rows = []
    for i, photo in enumerate(images):
        rows.append(photo)
        for t in tasks:
            rows += [render_output(t, out[t][i]), render_target(t, val, i)]
    make_grid(rows, cols=1 + 2 * len(tasks)).save(session.out / "samples" / f"step-{session.step:07d}.png")
    model.train()


def render_output(task: str, values: torch.Tensor, scale: int = 2):
    """An activated output (C, H, W) -> the condition image users get: the learned annotators' own
    conversion (``assets.predictor_condition``), keypoints through their decoder (``keypoints_at``)
    drawn ``scale`` x larger by the pose renderer."""
    from controlstack.annotators.pose import (  # local: heavy, only this path needs it
        render_animal,
        render_openpose,
    )

    v = values.float().cpu().numpy()
    if task not in KEYPOINTS:
        return to_condition(assets.predictor_condition(task, v))
    h, w = v.shape[1] * scale, v.shape[2] * scale
    found = assets.predictor_keypoints(task, v, w, h)
    return Image.fromarray(render_openpose(found, w, h, hands=False, face=False) if task == "pose"
                           else render_animal(found, w, h))


def render_target(task: str, batch: dict, i: int):
    if task in ("pose", "animal_pose"):
        k = KEYPOINTS[task]
        t = batch[task][i]
        return render_output(task, torch.cat([t[:k + 1], t[k + 1:k + 3]]))
    if task == "seg":
        return render_output(task, F.one_hot(batch["seg"][i], TASKS["seg"]).permute(2, 0, 1).float())
    return render_output(task, batch[task][i] if task != "depth" else batch["depth"][i])
