"""Recipes: the evaluation networks -- FID / KID features (``features``) and a world CLIP (``clip``).

Both learn from a world export only (``evaluation/networks.py`` says why the project trains them):

* ``features``: :class:`~controlstack.evaluation.networks.FeatureNet` predicts, from the photo,
  labels read off the scene's exact ground truth in the export's own columns -- the caption's
  content words (multi-hot, BCE), each seg class's share of the image (L1 on its square root, so
  small objects count), the number of visible things (``instances`` ids >= 2 covering at least
  the caption's minimum, cross-entropy) and the sky's mean colour (L1); each summed over its
  labels (:func:`feature_loss`);
* ``clip``: transformers' ``CLIPModel`` with its own symmetric InfoNCE loss (Radford et al. 2021,
  ``return_loss=True``) on (photo, caption) pairs; the text tower reads the world's tokenizer.

The session machinery is the other recipes' (progress, metrics.csv, exact resume, ``accelerate``).
Output: ``<output_dir>/model`` -- a FeatureNet folder, or a CLIP folder that ``CLIPModel`` /
``CLIPTokenizer.from_pretrained`` load (with ``preprocessor_config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from controlstack.errors import require
from controlstack.evaluation.networks import (
    ClipNetConfig,
    FeatureNet,
    FeatureNetConfig,
    build_clip,
    preprocessor_config,
    save_clip,
    save_feature_net,
)
from controlstack.training.config import TrainConfig, list_field
from controlstack.training.data import batches, image_to_tensor, load_image_dataset, make_dataloader
from controlstack.training.predictor import seg_to_classes
from controlstack.training.session import TrainingSession, make_lr_scheduler, make_optimizer
from controlstack.training.tokenizer import build_tokenizer

#: at least this share of the image (and 4 pixels) makes a thing visible: the captions' rule
MIN_PIXELS_FRACTION = 0.002
SKY, FIRST_ENTITY = 0, 2


def content_words() -> list[str]:
    """The caption vocabulary without function words: classes, colours, textures, poses, grounds."""
    from controlstack.world.captions import (  # local: heavy, only this path needs it
        FUNCTION_WORDS,
        VOCABULARY,
    )

    return [w for w in VOCABULARY if w not in FUNCTION_WORDS and w.isalpha()]


def scene_labels(text: str, seg: np.ndarray, instances: np.ndarray, image: np.ndarray,
                 config: FeatureNetConfig) -> dict[str, np.ndarray]:
    """One row's targets: words (multi-hot), classes (sqrt area share), count, sky (RGB in [0, 1])."""
    from controlstack.world.captions import caption_words  # local: heavy, only this path needs it

    said = set(caption_words(text))
    words = np.array([w in said for w in config.words], np.float32)
    ids = seg_to_classes(seg)
    share = np.bincount(ids.ravel(), minlength=len(config.classes))[:len(config.classes)] / ids.size
    counts = np.bincount(instances.ravel(), minlength=256)
    visible = int((counts[FIRST_ENTITY:] >= max(4, MIN_PIXELS_FRACTION * instances.size)).sum())
    sky_mask = instances == SKY
    sky = image[sky_mask].mean(0) / 255 if sky_mask.any() else np.zeros(3)
    return {"words": words, "classes": np.sqrt(share).astype(np.float32),
            "count": np.int64(min(visible, config.max_count)), "sky": sky.astype(np.float32),
            "has_sky": np.float32(sky_mask.any())}


@dataclass
class FeatureNetTrainConfig(TrainConfig):
    widths: tuple[int, ...] = list_field(16, 32, 64, 128)
    num_features: int = 64
    max_count: int = 8
    learning_rate: float = 1e-3
    output_dir: str = "outputs/train/features"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(len(self.widths) >= 2 and all(w % 8 == 0 for w in self.widths),
                "config key 'widths' needs >= 2 stages, each a multiple of 8 (GroupNorm's groups)")
        require(self.num_features >= 2 and self.max_count >= 1, "config keys 'num_features' / 'max_count' must be >= 2 / >= 1")

    def model_config(self) -> FeatureNetConfig:
        from controlstack.world.palette import CLASSES  # local: heavy, only this path needs it

        return FeatureNetConfig(image_size=self.resolution, widths=list(self.widths), num_features=self.num_features,
                                words=content_words(), classes=list(CLASSES), max_count=self.max_count)


class FeatureRows:
    """``Dataset.with_transform`` callable: a world row -> the photo in [-1, 1] and its labels."""

    def __init__(self, config: FeatureNetConfig):
        self.config = config

    def __call__(self, batch: dict) -> dict:
        out: dict = {"image": [], "words": [], "classes": [], "count": [], "sky": [], "has_sky": []}
        for im, text, seg, inst in zip(batch["image"], batch["text"], batch["seg"], batch["instances"]):
            rgb = np.asarray(im.convert("RGB"))
            out["image"].append(image_to_tensor(im, self.config.image_size, True))
            labels = scene_labels(text, np.asarray(seg.convert("RGB")), np.asarray(inst.convert("L")), rgb, self.config)
            for k, v in labels.items():
                out[k].append(torch.as_tensor(v))
        return out


def feature_loss(model: FeatureNet, batch: dict) -> dict[str, torch.Tensor]:
    """Each head's loss summed over its labels and averaged over the batch: a per-label mean would
    hand the 38 words 1/38 of the count's gradient, and the shared trunk would learn the count alone
    (measured: words stayed at their prior's loss, 0.51, for 2000 steps)."""
    out = model.outputs(model.embedding(batch["image"]))
    sky = ((torch.sigmoid(out["sky"]) - batch["sky"]).abs().sum(1) * batch["has_sky"]).mean()
    return {"words": F.binary_cross_entropy_with_logits(out["words"], batch["words"], reduction="none").sum(1).mean(),
            "classes": (torch.sigmoid(out["classes"]) - batch["classes"]).abs().sum(1).mean(),
            "count": F.cross_entropy(out["count"], batch["count"]), "sky": sky}


def train_features(config: FeatureNetTrainConfig, resume: bool = False):
    """Train and export the FID / KID feature network; returns the exported folder."""
    session = TrainingSession(config, "features", resume)
    acc = session.accelerator
    model_config = config.model_config()
    dataset = load_image_dataset(config.data, {"image": "image", "text": "text", "seg": "seg", "instances": "instances"})
    loader = make_dataloader(dataset, FeatureRows(model_config), config.batch_size, config.num_workers)
    torch.manual_seed(config.seed)

    def loss_of(model, batch):
        losses = feature_loss(acc.unwrap_model(model), batch)
        session.log_extra(**{f"loss_{k}": float(v.detach()) for k, v in losses.items()})
        return sum(losses.values())

    net = fit(session, FeatureNet(model_config), loader, loss_of)
    net.config.feature_scale = feature_rms(net, dataset, model_config.image_size)
    return session.export(lambda d: save_feature_net(net, d))


def fit(session: TrainingSession, model, loader, loss_of):
    """Both recipes' loop: AdamW and the schedule, ``accelerate``, exact resume, one optimiser step
    per ``loss_of(model, batch)``; returns the trained model, unwrapped, in eval mode."""
    acc = session.accelerator
    optimizer = make_optimizer(model.parameters(), session.config)
    lr_scheduler = make_lr_scheduler(optimizer, session.config, acc.num_processes)
    model, optimizer, loader, lr_scheduler = acc.prepare(model, optimizer, loader, lr_scheduler)
    session.restore()
    bar = session.progress()
    for batch in batches(acc, loader, session.micro) if not session.done else ():
        with acc.accumulate(model), acc.autocast():
            session.optimize(model, loss_of(model, batch), optimizer, lr_scheduler)
        if not acc.sync_gradients:
            continue
        session.end_step(bar, lr_scheduler)
        if session.done:
            break
    bar.close()
    return acc.unwrap_model(model).eval()


@torch.no_grad()
def feature_rms(net: FeatureNet, dataset, size: int, rows: int = 512) -> float:
    """The embedding's root mean square over the first ``rows`` training photos (``feature_scale``)."""
    images = [image_to_tensor(im, size, True) for im in dataset.select(range(min(rows, len(dataset))))["image"]]
    f = torch.cat([net.embedding(torch.stack(images[i:i + 64])) for i in range(0, len(images), 64)])
    return float(f.pow(2).mean().sqrt())


# -- CLIP -----------------------------------------------------------------------------------------

@dataclass
class ClipTrainConfig(TrainConfig):
    patch_size: int = 16
    width: int = 128
    layers: int = 4
    heads: int = 4
    projection_dim: int = 64
    max_length: int = 32
    learning_rate: float = 5e-4
    batch_size: int = 128
    output_dir: str = "outputs/train/clip"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.resolution % self.patch_size == 0, "config key 'resolution' must be a multiple of 'patch_size'")
        require(self.width % self.heads == 0, "config key 'width' must be a multiple of 'heads'")

    def model_config(self) -> ClipNetConfig:
        return ClipNetConfig(image_size=self.resolution, patch_size=self.patch_size, width=self.width,
                             layers=self.layers, heads=self.heads, projection_dim=self.projection_dim,
                             max_length=self.max_length)


class ClipRows:
    """A world row -> CLIP's pixel values (the preprocessor's mean / std) and token ids."""

    def __init__(self, tokenizer, pre: dict, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.mean = torch.tensor(pre["image_mean"])[:, None, None]
        self.std = torch.tensor(pre["image_std"])[:, None, None]
        self.size = pre["crop_size"]["height"]

    def __call__(self, batch: dict) -> dict:
        ids = self.tokenizer([str(t) for t in batch["text"]], padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {"pixel_values": [(image_to_tensor(im, self.size, False) - self.mean) / self.std for im in batch["image"]],
                "input_ids": list(ids.input_ids), "attention_mask": list(ids.attention_mask)}


def train_clip(config: ClipTrainConfig, resume: bool = False):
    """Train and export the world CLIP; returns the exported folder."""
    session = TrainingSession(config, "clip", resume)
    tokenizer = build_tokenizer("world", config.max_length)
    pre = preprocessor_config(config.resolution)
    dataset = load_image_dataset(config.data, {"image": "image", "text": "text"})
    loader = make_dataloader(dataset, ClipRows(tokenizer, pre, config.max_length), config.batch_size, config.num_workers)
    torch.manual_seed(config.seed)
    net = fit(session, build_clip(config.model_config(), tokenizer), loader,
              lambda model, batch: model(**batch, return_loss=True).loss)
    return session.export(lambda d: save_clip(net, tokenizer, d))

