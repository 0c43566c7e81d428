"""Tiny synthetic world-like dataset (same columns as ``controlstack world export``) and models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WORDS = ("red", "blue", "green", "striped", "checker", "sphere", "cube", "cone", "dog", "person")
COLUMNS = ("image", "depth", "normal", "seg", "instances", "softedge", "canny", "scribble", "pose")


def make_rows(n: int, size: int, seed: int) -> dict:
    """Random coloured rectangles; hints are derived from the rectangles so they agree."""
    rng = np.random.default_rng(seed)
    rows: dict = {c: [] for c in COLUMNS} | {"text": [], "keypoints": []}
    for _ in range(n):
        img = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
        mask = np.zeros((size, size), np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = x0 + rng.integers(4, size // 2), y0 + rng.integers(4, size // 2)
        img[y0:y1, x0:x1] = rng.integers(0, 255, 3)
        mask[y0:y1, x0:x1] = 255
        edge = np.zeros_like(mask)
        edge[y0, x0:x1] = edge[y1 - 1, x0:x1] = edge[y0:y1, x0] = edge[y0:y1, x1 - 1] = 255
        rows["image"].append(Image.fromarray(img))
        for c in ("depth", "seg", "instances", "softedge", "scribble", "pose"):
            rows[c].append(Image.fromarray(mask if c in ("depth", "seg", "instances") else edge).convert("RGB"))
        rows["normal"].append(Image.fromarray(np.stack([mask, mask // 2, mask // 3], -1)))
        rows["canny"].append(Image.fromarray(edge).convert("RGB"))
        words = rng.choice(WORDS, 3)
        rows["text"].append(f"a {words[0]} {words[1]} {words[2]}")
        rows["keypoints"].append(json.dumps({"people": []}))
    return rows


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """An HF datasets folder with 8 rows of 32x32 images."""
    import datasets

    features = datasets.Features(
        {c: datasets.Image() for c in COLUMNS} | {"text": datasets.Value("string"),
                                                  "keypoints": datasets.Value("string")}
    )
    path = tmp_path_factory.mktemp("world") / "data"
    datasets.Dataset.from_dict(make_rows(8, 32, seed=0), features=features).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny Stable Diffusion folder (models.tiny) as the base recipe would export it."""
    from controlstack.models.tiny import tiny_sd
    from controlstack.training.base import export_pipeline

    sd = tiny_sd(seed=0, max_length=8)
    path = tmp_path_factory.mktemp("base") / "model"
    export_pipeline(path, sd.vae, sd.text_encoder, sd.tokenizer, sd.unet)
    return str(path)


@pytest.fixture(scope="session")
def tiny_vae_dir(tiny_base_dir):
    return str(Path(tiny_base_dir) / "vae")


def tiny_controlnet_config(world_dir, base_dir, out, **kw):
    from controlstack.training.controlnet import ControlNetConfig

    values = dict(
        data=world_dir, base=base_dir, output_dir=str(out), resolution=32, batch_size=2, max_steps=2,
        hint_channels=(8, 8, 8, 8), checkpoint_every=1, validate_every=2, log_every=1,
        num_validation_images=1, num_inference_steps=2, learning_rate=1e-3, seed=3,
    )
    return ControlNetConfig(**(values | kw))
