"""``render(scene, size)``: the image and every condition, keyed by the dataset's column names.

Keypoints are the figures' exact 3-D joints projected by the camera. A keypoint is

* *visible* (OpenPose confidence 1.0, COCO visibility 2) when it is in the frame and nothing lies
  in front of the body around it: the rendered depth at its pixel is at least its own depth minus
  its body radius (``Figure.tolerance``);
* *occluded* (confidence 0.5, visibility 1) when it is in the frame but something is in front;
* *absent* (``0, 0, 0``) outside the frame.

A figure appears in ``keypoints`` (and is drawn in ``pose``) when at least one keypoint is visible.
``keypoints`` JSON (pixel coordinates, pixel ``j`` spans ``[j, j+1)``)::

    {"people": [{"pose_keypoints_2d": [x, y, c, ...18 points]}],        # OpenPose / ControlNet
     "animals": [{"category": "dog", "keypoints": [x, y, v, ...17 points],  # COCO-style AP-10K
                  "num_keypoints": n_labelled, "bbox": [x, y, w, h]}],
     "canvas_width": W, "canvas_height": H}
"""

from __future__ import annotations

import json

import numpy as np

from controlstack.world import annotate, camera, captions
from controlstack.world.config import check_size
from controlstack.world.figures import AP10K_SKELETON
from controlstack.world.raytrace import GBuffer, trace
from controlstack.world.scene import Scene

COLUMNS = (
    "image",
    "text",
    "depth",
    "normal",
    "seg",
    "instances",
    "softedge",
    "canny",
    "scribble",
    "pose",
    "keypoints",
)


def keypoints_2d(entity, gbuf: GBuffer) -> np.ndarray:
    """``(K, 3)``: pixel x, y and confidence (1 visible, 0.5 occluded, 0 outside the frame)."""
    size = gbuf.size
    uv, z = camera.project(entity.keypoints, size)
    out = np.zeros((len(uv), 3))
    inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < size) & (uv[:, 1] >= 0) & (uv[:, 1] < size)
    idx = np.flatnonzero(inside)
    cols = uv[idx, 0].astype(int)
    rows = uv[idx, 1].astype(int)
    front = gbuf.depth[rows, cols] >= z[idx] - entity.tolerance[idx]
    out[idx, :2] = uv[idx]
    out[idx, 2] = np.where(front, 1.0, 0.5)
    return out


def _keypoint_record(entity, kps: np.ndarray, instance: np.ndarray) -> dict:
    flat = [round(float(v), 2) for v in kps.ravel()]
    if entity.kind == "person":
        return {"pose_keypoints_2d": flat}
    # COCO visibility: 2 visible, 1 labelled but occluded, 0 not labelled.
    vis = np.select([kps[:, 2] >= 1.0, kps[:, 2] > 0], [2, 1], 0)
    coco = np.concatenate([np.round(kps[:, :2], 2), vis[:, None]], axis=1)
    rows, cols = np.nonzero(instance == entity.instance)
    bbox = (
        [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)]
        if rows.size
        else [0, 0, 0, 0]
    )
    return {
        "category": entity.cls,
        "keypoints": [float(v) if i % 3 < 2 else int(v) for i, v in enumerate(coco.ravel())],
        "num_keypoints": int((vis > 0).sum()),
        "bbox": bbox,
    }


def render(scene: Scene, size: int | None = None) -> dict:
    """Render ``scene`` at ``size x size`` (default: ``scene.config.size``): a dict with exactly
    :data:`COLUMNS` as keys.

    Images are uint8 arrays: ``image``, ``normal``, ``seg``, ``pose`` ``(H, W, 3)`` RGB; ``depth``,
    ``softedge``, ``canny``, ``scribble`` ``(H, W)`` grey; ``instances`` ``(H, W)`` instance ids
    (0 sky, 1 ground, 2 + i entity i). ``text`` and ``keypoints`` are strings.
    """
    size = scene.config.size if size is None else check_size(size)
    gbuf = trace(scene, size)
    return annotations(scene, gbuf)


def annotations(scene: Scene, gbuf: GBuffer) -> dict:
    """All columns from an already traced G-buffer."""
    size = gbuf.size
    image = np.round(gbuf.image * 255).astype(np.uint8)
    edges = annotate.boundaries(gbuf.depth, gbuf.normal, gbuf.instance)
    # The scribble's jitter is part of the scene's randomness, but drawn from its own stream so
    # that it does not shift the scene layout.
    seed = scene.seed if isinstance(scene.seed, (list, tuple)) else [scene.seed]
    rng = np.random.default_rng([*seed, 0x5C81BB1E])
    people, animals, records = [], [], {"people": [], "animals": []}
    for e in scene.entities:
        if e.keypoints is None:
            continue
        kps = keypoints_2d(e, gbuf)
        if not (kps[:, 2] >= 1.0).any():
            continue
        (people if e.kind == "person" else animals).append(kps)
        records["people" if e.kind == "person" else "animals"].append(_keypoint_record(e, kps, gbuf.instance))
    records.update(canvas_width=size, canvas_height=size)
    return {
        "image": image,
        "text": captions.caption(scene.entities, scene.ground, gbuf.instance, gbuf.depth),
        "depth": annotate.encode_depth(gbuf.depth),
        "normal": annotate.encode_normal(gbuf.normal, gbuf.instance == 0),
        "seg": annotate.encode_seg(gbuf.semantic),
        "instances": gbuf.instance,
        "softedge": annotate.softedge(edges),
        "canny": annotate.canny(image),
        "scribble": annotate.scribble(edges, rng),
        "pose": annotate.draw_pose(size, people, animals, AP10K_SKELETON),
        "keypoints": json.dumps(records, separators=(",", ":")),
    }
