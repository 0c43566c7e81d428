"""The networks that FID, KID and CLIP score look through, trained by the project on its world.

FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) compare two image sets in the feature
space of a network; CLIP score (Hessel et al. 2021) is ``100 · max(cos(E_I(x), E_T(c)), 0)``
with CLIP's two encoders. The papers use Inception-v3 and OpenAI's CLIP, neither of which can be
downloaded here, so the project trains its own on world images, whose content is known exactly:

* :class:`FeatureNet` -- a small CNN (~0.6 M parameters) that predicts from a photo what the
  scene graph says: the caption's content words (classes, colours, textures, poses, ground), each
  seg class's area, the number of visible things and the sky's colour. Its ``num_features``-wide
  embedding (before those heads) is the FID / KID feature. Because it was trained to tell scene
  content apart, distances in it measure content, not reconstruction (which is what a VAE
  encoder's features measure).
* a small CLIP -- transformers' :class:`~transformers.CLIPModel` (ViT image tower, text tower over
  the world's tokenizer), trained contrastively on world photos and their captions.

Users with real weights plug them in: :func:`load_feature_extractor` takes NVIDIA's TorchScript
Inception (``inception-2015-12-05.pt``, what clean-fid and StyleGAN's metrics use; TorchScript runs
code, so it is opt-in) and :class:`ClipScorer` takes any local CLIP folder (``CLIPModel`` +
tokenizer + ``preprocessor_config.json``).

Resizing follows clean-fid (Parmar et al. 2022): images are quantised to uint8 first, then each
channel is resized as a float image with PIL's bicubic filter (no aliasing from integer resizes).
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

from controlstack import assets
from controlstack.errors import ControlstackError, require

FEATURE_WEIGHTS, CONFIG = "model.safetensors", "config.json"


def clean_resize(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images ``(B, 3, H, W)`` -> float32 ``(B, 3, size, size)`` in [0, 255], clean-fid's rule:
    every channel resized as a float ("F" mode) PIL image with the bicubic filter, then clipped."""
    a = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    require(a.ndim == 4 and a.shape[1] == 3, f"expected images (B, 3, H, W), got shape {tuple(a.shape)}")
    if a.shape[2:] == (size, size):
        return torch.from_numpy(a.astype(np.float32))
    out = np.empty((a.shape[0], 3, size, size), np.float32)
    for i in range(a.shape[0]):
        for c in range(3):
            im = Image.fromarray(a[i, c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(im.resize((size, size), resample=Image.BICUBIC))
    return torch.from_numpy(np.clip(out, 0, 255))


# -- the FID / KID feature network ---------------------------------------------------------------

@dataclass
class FeatureNetConfig:
    image_size: int = 128
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # per stride-2 stage
    num_features: int = 64       # the embedding FID / KID use
    words: list[str] = field(default_factory=list)    # caption words it predicts (multi-hot)
    classes: list[str] = field(default_factory=list)  # seg classes whose area it predicts
    max_count: int = 8           # visible things: 0 .. max_count (more are max_count)
    # the features FID / KID see are the embedding / feature_scale, its RMS over training photos:
    # unit-sized like Inception's, so KID's kernel (x·y / d + 1)³ is in its usual range
    feature_scale: float = 1.0

    @property
    def num_outputs(self) -> int:
        return len(self.words) + len(self.classes) + self.max_count + 1 + 3


def _stage(cin: int, cout: int) -> nn.Sequential:
    # no norm after a stage's last conv: GroupNorm there would zero every group's mean, and the
    # embedding is a spatial mean -- colour and brightness would reach it only as higher moments
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.SiLU())


class FeatureNet(nn.Module):
    """uint8 photos ``(B, 3, H, W)`` -> ``(B, num_features)`` (torchmetrics' custom-extractor API)."""

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        w = config.widths
        self.stages = nn.Sequential(*[_stage(a, b) for a, b in zip([3, *w[:-1]], w)])
        self.embed = nn.Linear(w[-1], config.num_features)
        self.heads = nn.Linear(config.num_features, config.num_outputs)

    @property
    def num_features(self) -> int:
        return self.config.num_features

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input ``[-1, 1]`` at ``image_size`` -> the embedding."""
        return self.embed(self.stages(x).mean((2, 3)))

    def outputs(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads' logits, split: words, classes (area), count, sky (RGB)."""
        c = self.config
        sizes = [len(c.words), len(c.classes), c.max_count + 1, 3]
        return dict(zip(("words", "classes", "count", "sky"), self.heads(features).split(sizes, 1)))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = clean_resize(images, self.config.image_size)
        p = next(self.parameters())
        return (self.embedding((x / 127.5 - 1).to(p)) / self.config.feature_scale).float()


def save_feature_net(model: FeatureNet, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps({"_class_name": "FeatureNet", **asdict(model.config)}, indent=2))
    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}, str(folder / FEATURE_WEIGHTS))
    return folder


def load_feature_net(folder: str | Path) -> FeatureNet:
    folder = Path(folder)
    require((folder / CONFIG).is_file() and (folder / FEATURE_WEIGHTS).is_file(),
            f"'{folder}' is not a feature network folder (config.json + model.safetensors)")
    values = json.loads((folder / CONFIG).read_text())
    require(values.pop("_class_name", None) == "FeatureNet", f"'{folder}' holds no FeatureNet (config.json)")
    model = FeatureNet(FeatureNetConfig(**values))
    state = {k: v.float() for k, v in load_file(str(folder / FEATURE_WEIGHTS)).items()}
    model.load_state_dict(state)
    return model.eval()


class TorchScriptInception(nn.Module):
    """NVIDIA's TorchScript Inception-v3 (``inception-2015-12-05.pt``): float [0, 255] at 299 px
    -> 2048 pool features, what clean-fid computes FID with."""

    num_features = 2048

    def __init__(self, path: str | Path):
        super().__init__()
        self.net = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(clean_resize(images, 299), return_features=True).float()


def load_feature_extractor(source: str | Path | None = None, allow_torchscript: bool = False) -> nn.Module:
    """The FID / KID feature network: the bundled one (``None``), a :class:`FeatureNet` folder, or
    (with ``allow_torchscript``) a TorchScript Inception file, or a folder holding one."""
    if source is None:
        return load_feature_net(assets.evaluation_folder("features"))
    p = Path(source)
    require(p.exists(), f"feature network '{p}' not found")
    if p.is_dir() and not (p / CONFIG).is_file():  # an Inception folder: the TorchScript file inside it
        scripts = sorted(p.glob("*.pt"))
        require(len(scripts) == 1, f"'{p}' holds neither a FeatureNet (config.json) nor one TorchScript .pt file")
        p = scripts[0]
    if p.is_file():
        require(allow_torchscript, f"'{p}' would be loaded as TorchScript, which runs code; pass --trust-torchscript "
                                   "(Python: allow_torchscript=True) if you trust the file")
        try:
            return TorchScriptInception(p)
        except RuntimeError as exc:
            raise ControlstackError(f"'{p}' is not a TorchScript Inception: {str(exc).splitlines()[0]}") from None
    return load_feature_net(p)


# -- the text-image network (CLIP score) ----------------------------------------------------------

@dataclass
class ClipNetConfig:
    image_size: int = 128
    patch_size: int = 16
    width: int = 128            # both towers
    layers: int = 4
    heads: int = 4
    projection_dim: int = 64
    max_length: int = 32


def build_clip(config: ClipNetConfig, tokenizer):
    """A randomly initialised transformers ``CLIPModel`` for the world's tokenizer."""
    from transformers import CLIPConfig, CLIPModel  # local: heavy, only this path needs it

    shared = dict(hidden_size=config.width, intermediate_size=4 * config.width, num_hidden_layers=config.layers,
                  num_attention_heads=config.heads)
    text = dict(shared, vocab_size=len(tokenizer), max_position_embeddings=config.max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(shared, image_size=config.image_size, patch_size=config.patch_size)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim))


def preprocessor_config(image_size: int) -> dict:
    """CLIP's image preprocessing in ``CLIPImageProcessor``'s file format (OpenAI's mean / std)."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def save_clip(model, tokenizer, folder: str | Path) -> Path:
    """A CLIP folder as ``ClipScorer.load`` and transformers read it: the model (safetensors), its
    tokenizer and ``preprocessor_config.json`` for the model's image size."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(model.config.vision_config.image_size), indent=2))
    return folder


class ClipScorer:
    """A CLIP folder (the bundled world CLIP, or a local real one) -> embeddings and CLIP score."""

    def __init__(self, model, tokenizer, preprocess: dict):
        self.model, self.tokenizer, self.pre = model.eval(), tokenizer, preprocess
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, folder: str | Path | None = None) -> ClipScorer:
        from transformers import CLIPModel, CLIPTokenizer  # local: heavy, only this path needs it

        if folder is None:
            folder = assets.evaluation_folder("clip")
        p = Path(folder)
        require((p / "config.json").is_file() and (p / "preprocessor_config.json").is_file(),
                f"'{p}' is not a CLIP folder (config.json, model weights, tokenizer, preprocessor_config.json)")
        from transformers.utils import logging as hf_logging  # local: heavy, only this path needs it

        hf_logging.disable_progress_bar()  # its "Loading weights" bar at every load: noise in a report run
        try:
            model = CLIPModel.from_pretrained(p, torch_dtype=torch.float32)
            tokenizer = CLIPTokenizer.from_pretrained(p)
        except (OSError, ValueError) as exc:
            raise ControlstackError(f"cannot load CLIP from '{p}': {str(exc).splitlines()[0]}") from None
        return cls(model, tokenizer, json.loads((p / "preprocessor_config.json").read_text()))

    def pixel_values(self, images) -> torch.Tensor:
        """PIL images or uint8 arrays (H, W, 3) -> CLIP's input: shortest edge resized (bicubic),
        centre-cropped, scaled and normalised as the folder's preprocessor_config.json says."""
        edge = self.pre["size"].get("shortest_edge", self.pre["crop_size"]["height"])
        ch, cw = self.pre["crop_size"]["height"], self.pre["crop_size"]["width"]
        out = []
        for im in images:
            im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))
            im = im.convert("RGB")
            s = edge / min(im.size)
            im = im.resize((max(cw, round(im.width * s)), max(ch, round(im.height * s))), Image.BICUBIC)
            left, top = (im.width - cw) // 2, (im.height - ch) // 2
            out.append(np.asarray(im.crop((left, top, left + cw, top + ch)), np.float32))
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) * self.pre.get("rescale_factor", 1 / 255)
        mean, std = torch.tensor(self.pre["image_mean"]), torch.tensor(self.pre["image_std"])
        return (x - mean[:, None, None]) / std[:, None, None]

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        e = self.model.get_image_features(pixel_values=self.pixel_values(images))
        e = getattr(e, "pooler_output", e)
        return F.normalize(e.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        e = self.model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        e = getattr(e, "pooler_output", e)
        return F.normalize(e.float(), dim=-1)

    def scores(self, images, texts: list[str]) -> np.ndarray:
        """CLIP score of each (image, text) pair: ``100 · max(cos, 0)``."""
        require(len(images) == len(texts), f"{len(images)} images but {len(texts)} texts")
        cos = (self.image_embeds(images) * self.text_embeds(texts)).sum(-1)
        return (100 * cos.clamp(min=0)).numpy()

    def retrieval(self, images, texts: list[str]) -> dict[str, float]:
        """Top-1 accuracy of image -> caption and caption -> image among the given pairs."""
        sim = self.image_embeds(images) @ self.text_embeds(texts).T
        target = torch.arange(len(texts))
        return {"image_to_text": float((sim.argmax(1) == target).float().mean()),
                "text_to_image": float((sim.argmax(0) == target).float().mean())}
