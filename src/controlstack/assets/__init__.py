"""The bundled default model (embedded in the package, offline).

``bundle/`` holds a diffusers Stable Diffusion folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) and ``bundle/controlnets/<name>/`` one diffusers ControlNet
folder per condition type, all trained by the project's own recipes on its procedural world
(see the model card ``bundle/README.md``).

Until that bundle is trained and committed, the default is a *tiny seeded random* model of the
same layout with randomly initialised ControlNets under the bundled names: everything runs end to
end and shows the plumbing, but the images are noise-like. ``is_placeholder()`` tells which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from controlstack.errors import require

BUNDLE_DIR = Path(__file__).resolve().parent / "bundle"
BUNDLED_NAMES = ("canny", "depth", "seg", "pose", "scribble", "softedge")
REQUIRED_CONTROLNETS = ("canny", "depth", "seg", "pose")  # the bundle is the default once all exist
CHECKSUMS = "SHA256SUMS"  # `sha256sum -c` format, over every weight and config file of the bundle
_MODEL_PARTS = ("model_index.json", "controlstack.json", "vae", "unet", "text_encoder", "tokenizer", "scheduler",
                "controlnets", "mi", "predictor", "evaluation", "ip_adapter", "sd3", "lcm")
#: the bundled bases reached by name (``--model NAME``, ``Pipeline.from_pretrained(NAME)``): their folders
#: in the bundle. ``lcm`` holds a U-Net and scheduler only: the rest is the bundled base's (a student of it).
BUNDLED_BASES = {"lcm": "lcm", "sd3": "sd3"}


def has_trained_base(bundle: Path | None = None) -> bool:
    """The bundle's base (VAE, U-Net, text encoder) is trained and committed; ControlNets may be pending."""
    return ((BUNDLE_DIR if bundle is None else bundle) / "model_index.json").is_file()


def is_placeholder(bundle: Path | None = None) -> bool:
    """True until the bundle holds a base *and* a ControlNet for each of ``REQUIRED_CONTROLNETS``.
    A half-trained bundle (some ControlNet stages pending) keeps the placeholder as the default, so
    the default always answers every bundled name; load it explicitly meanwhile with
    ``Pipeline.from_pretrained(assets.BUNDLE_DIR)`` (its trained ControlNets: ``Control(path)``)."""
    bundle = BUNDLE_DIR if bundle is None else bundle
    has_cns = all((bundle / "controlnets" / n / "config.json").is_file() for n in REQUIRED_CONTROLNETS)
    return not (has_trained_base(bundle) and has_cns)


def bundled_controlnets() -> dict:
    """name -> zero-argument loader of the bundled ControlNet of that condition type."""
    if is_placeholder():
        return {name: (lambda name=name: _placeholder_controlnet(name)) for name in BUNDLED_NAMES}
    return trained_controlnets()


def trained_controlnets(bundle: Path = BUNDLE_DIR) -> dict:
    """name -> loader of each ControlNet trained so far in ``bundle`` (complete or not)."""
    from controlstack.io.checkpoints import load_controlnet  # local: heavy, only this path needs it

    root = bundle / "controlnets"
    folders = sorted(p for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    return {p.name: (lambda p=p: load_controlnet(p)) for p in folders}


def default_pipeline(cls):
    """``cls`` (Pipeline) over the bundled model, or the tiny placeholder while none is bundled."""
    if is_placeholder():
        from controlstack.models.tiny import tiny_sd  # local: heavy, only this path needs it

        logging.getLogger("controlstack").warning(
            "no trained bundle in this checkout: using a tiny random placeholder model"
        )
        return cls(tiny_sd(seed=0, max_length=32), controlnets=bundled_controlnets(), name="placeholder-tiny")
    from controlstack.io.checkpoints import load_base  # local: heavy, only this path needs it

    return cls.from_source(load_base(BUNDLE_DIR), bundled_controlnets(), "controlstack-bundle", BUNDLE_DIR)


_PLACEHOLDER_CN: dict = {}


def _placeholder_controlnet(name: str):
    from controlstack.models.tiny import tiny_controlnet, tiny_unet  # local: heavy, only this path needs it

    if name not in _PLACEHOLDER_CN:
        seed = sum(map(ord, name))  # a different, fixed ControlNet per name
        # tiny_unet(0) is the placeholder base's U-Net (tiny_sd(seed=0) builds it with seed 0);
        # building only it avoids a whole VAE + text encoder per ControlNet
        _PLACEHOLDER_CN[name] = tiny_controlnet(tiny_unet(0), seed=seed)
    return _PLACEHOLDER_CN[name]


def bundled_base(name: str, bundle: Path | None = None) -> Path | None:
    """The folder of the bundled base called ``name`` (``lcm``, ``sd3``), None for any other string;
    a one-line error when this checkout lacks it."""
    if name not in BUNDLED_BASES:
        return None
    folder = (bundle or BUNDLE_DIR) / BUNDLED_BASES[name]
    require((folder / "unet").is_dir() or (folder / "transformer").is_dir(),
            f"this checkout has no bundled '{name}' model ({folder}); train it with `make bundle STAGES={name}`")
    return folder


def load_student(folder: Path, torch_dtype, bundle: Path | None = None):
    """A bundled student (``lcm``: its U-Net and scheduler) with the bundled base's VAE, text encoder
    and tokenizer: the components of a whole base."""
    from diffusers import UNet2DConditionModel  # local: heavy, only this path needs it

    from controlstack.io.checkpoints import load_base  # local: heavy, only this path needs it

    base = load_base(bundle or BUNDLE_DIR, torch_dtype=torch_dtype)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=base.unet.dtype).eval()
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return dataclasses.replace(base, unet=unet, scheduler_config=scheduler)


def file_digests(bundle: Path = BUNDLE_DIR) -> dict[str, str]:
    """relative path -> sha256 of every model file in ``bundle`` (not the model card or numbers)."""
    out = {}
    for part in _MODEL_PARTS:
        root = bundle / part
        for path in sorted([root] if root.is_file() else root.rglob("*") if root.is_dir() else []):
            if path.is_file() and not path.name.startswith(".") and path.name != "README.md":  # cards change
                out[path.relative_to(bundle).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_checksums(bundle: Path = BUNDLE_DIR) -> Path:
    path = bundle / CHECKSUMS
    path.write_text("".join(f"{digest}  {name}\n" for name, digest in file_digests(bundle).items()))
    return path


def verify_checksums(bundle: Path = BUNDLE_DIR) -> list[str]:
    """One line per problem (a changed, missing or unrecorded file); empty when the bundle is intact."""
    path = bundle / CHECKSUMS
    if not path.is_file():
        return [f"{path} is missing"]
    pairs = [line.split("  ", 1) for line in path.read_text().splitlines() if line.strip()]
    recorded = {name: digest for digest, name in pairs}
    actual = file_digests(bundle)
    problems = [f"{name}: checksum differs" for name in recorded if name in actual and actual[name] != recorded[name]]
    problems += [f"{name}: missing" for name in recorded if name not in actual]
    problems += [f"{name}: not recorded in {CHECKSUMS}" for name in actual if name not in recorded]
    return problems


# -- the evaluation networks (FID / KID features, CLIP score; evaluation/networks.py) ------------

EVALUATION_NETWORKS = ("features", "clip")


def evaluation_folder(name: str, bundle: Path = BUNDLE_DIR) -> Path:
    """The bundled evaluation network ``name`` (features | clip); a one-line error when missing."""
    require(name in EVALUATION_NETWORKS, f"unknown evaluation network '{name}'; choose one of "
                                         f"{', '.join(EVALUATION_NETWORKS)}")
    folder = bundle / "evaluation" / name
    require((folder / "config.json").is_file(), f"this checkout has no bundled {name} network ({folder}); "
                                               f"train it with `controlstack train {name}` or pass your own")
    return folder


def ip_adapter_files(bundle: Path = BUNDLE_DIR) -> tuple[Path, Path] | None:
    """(adapter file, image encoder folder) of the bundled IP-Adapter, None when this checkout has none."""
    folder = bundle / "ip_adapter"
    f, encoder = folder / "ip-adapter.safetensors", folder / "image_encoder"
    return (f, encoder) if f.is_file() and (encoder / "config.json").is_file() else None


# -- the multi-task dense predictor behind the learned annotators (OmniControlNet stage 1) -------

def predictor_folder(bundle: Path = BUNDLE_DIR) -> Path | None:
    """The bundled predictor's folder, None when this checkout has none."""
    folder = bundle / "predictor"
    return folder if (folder / "model.safetensors").is_file() else None


def load_predictor(folder: Path):
    from controlstack.models.predictor import cached_predictor  # local: heavy, only this path needs it

    return cached_predictor(folder)


def run_predictor(model, rgb, tasks) -> dict:
    from controlstack.models.predictor import predict  # local: heavy, only this path needs it

    return predict(model, rgb, tasks)


def predictor_condition(task: str, values):
    """A dense task's output -> its condition array (seg coloured with the world's palette)."""
    from controlstack.models.predictor import to_condition_array  # local: heavy, only this path needs it

    if task == "seg":
        from controlstack.world.palette import PALETTE  # local: heavy, only this path needs it

        return PALETTE[values.argmax(0)]
    return to_condition_array(task, values)


def predictor_keypoints(task: str, values, width: int, height: int, min_confidence: float = 0.0) -> list:
    from controlstack.models.predictor import keypoints_at  # local: heavy, only this path needs it

    return keypoints_at(task, values, width, height, min_confidence)
