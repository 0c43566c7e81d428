"""``controlstack evaluate``: a grid of generations on held-out world scenes, measured the papers' way.

The grid is model × control type × mode × CFG × prompt style (:class:`EvaluateConfig`). Every
cell generates one image per held-out scene (seeds ``[HELD_OUT_SEED, start + i]``, never used in
training; sampling seed ``seed + i``) and is measured against the same scenes' real renders:

* FID / KID on the project's feature network and CLIP score on its world CLIP
  (``quality.py``; a user's own Inception / CLIP can replace either);
* condition fidelity of the control type (``fidelity.py``) -- for the no-control rows, of every
  control type of the grid: the baseline a control must beat;
* optionally Asym / NAsym of each ControlNet (``asym.py``; MIControlNet's conservativity measure).

Models (the ControlNet of a row, per control type): ``plain`` is the base's ControlNet of that
name, ``mi`` its Minimal Impact ControlNet ``mi-<type>``, ``omni`` the Omni ControlNet with the
type's task token, anything else a ControlNet folder or file. Prompt styles: ``empty`` (no
prompt: the paper's hardest test of control), ``brief`` (the first noun phrase and the ground,
``mi.brief_caption``) and ``full`` (the scene's caption). CLIP score always compares the image with
the full caption.

Generations are cached as PNGs under ``DIR/images/<row>/`` with the settings they were made
with; a rerun skips what exists with the same settings, so an interrupted run resumes. Output:
``DIR/metrics.json`` (schema in :func:`run`) and ``DIR/report.html`` (``html.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from controlstack import Control, Pipeline, assets
from controlstack.errors import ControlstackError, require
from controlstack.evaluation.asym import measure_asym
from controlstack.evaluation.fidelity import PROTOCOLS, FidelityMeter, supported
from controlstack.evaluation.html import write_report
from controlstack.evaluation.mi import brief_caption, total_variation
from controlstack.evaluation.networks import ClipScorer, load_feature_extractor
from controlstack.evaluation.quality import (
    KID_NOTE,
    FidKid,
    clip_score,
    fid_min_scenes,
    reference,
    small_sample_note,
)
from controlstack.injection import available, make_injection
from controlstack.io.images import resize_image
from controlstack.io.paths import output_folder
from controlstack.models.tiers import TIERS
from controlstack.prompting import project_prompts
from controlstack.sampling.schedulers import SCHEDULERS
from controlstack.training.config import check_keys, coerce_fields, read_yaml
from controlstack.training.data import load_image_dataset
from controlstack.training.predictor import instances

PROMPT_STYLES = ("empty", "brief", "full")
MODEL_KINDS = ("plain", "mi", "omni")
NONE = "none"
#: the world's condition columns a row can use (Omni reads ``softedge`` through its ``hed`` token)
CONTROL_TYPES = ("canny", "depth", "seg", "pose", "normal", "softedge", "scribble")
OMNI_TASK = {"softedge": "hed"}


#: presets that fix a published protocol's settings. ``controlnet++``: ControlNet++'s controllability
#: evaluation (Li et al., ECCV 2024, Sec. 4.1; UniControl and Uni-ControlNet report the same measures):
#: UniPC 20 steps, CFG 7.5, diffusers' balanced mode, fixed seeds, 4 images per condition, its metrics
PRESETS = {"controlnet++": {"steps": 20, "scheduler": "unipc", "cfg": (7.5,), "modes": ("balanced",),
                            "prompt_styles": ("full",), "images_per_condition": 4, "protocol": "controlnet++"}}


@dataclass
class EvaluateConfig:
    scenes: int = 8                                   # held-out world scenes (or --data rows) per row
    data: str = ""                                    # a datasets folder of the user's (image, text, conditions); "" = the world
    seed: int = 0                                     # sampling seed of scene i: seed + i
    start: int = 0                                    # first held-out scene index
    base: str = ""                                    # SD folder / file; "" = the bundle
    controls: tuple[str, ...] = ("canny", "depth")    # control types; "none" = the base alone
    models: tuple[str, ...] = ("plain",)              # plain | mi | omni | a ControlNet path
    modes: tuple[str, ...] = ("auto",)                # injection modes (NAME or NAME:KEY=VALUE); auto = what the models recommend
    cfg: tuple[float, ...] = (7.5,)
    prompt_styles: tuple[str, ...] = ("full",)        # empty | brief | full
    steps: int = 20
    scheduler: str = "unipc"
    size: int = 0                                     # 0: the base's native size
    features: str = ""                                # FID / KID network: "" bundled; a FeatureNet folder or TorchScript .pt
    trust_torchscript: bool = False                   # allow features to be TorchScript (it runs code)
    clip: str = ""                                    # CLIP folder; "" bundled
    asym_steps: int = 0                               # > 0: Asym / NAsym of each ControlNet on this many batches of 4
    grid_scenes: int = 4                              # scenes shown per grid in the report
    optimize: str = "parity"                          # speed tier the images are made in (models/tiers.py)
    preset: str = ""                                  # a published protocol's settings (PRESETS); they win
    protocol: str = "project"                         # fidelity measures: project | controlnet++ (fidelity.py)
    images_per_condition: int = 1                     # images per scene, seeds seed + i (i over the repeats)
    extra: dict = field(default_factory=dict)         # free-form notes copied into metrics.json

    def __post_init__(self) -> None:
        if self.preset:
            require(self.preset in PRESETS, f"unknown preset '{self.preset}'; choose one of {', '.join(PRESETS)}")
            for key, value in PRESETS[self.preset].items():
                setattr(self, key, value)
        for name in ("controls", "models", "modes", "cfg", "prompt_styles"):
            v = getattr(self, name)
            if isinstance(v, (str, int, float)) and not isinstance(v, bool):
                setattr(self, name, (v,))
        coerce_fields(self)
        require(self.scenes >= 2, f"--scenes must be >= 2 (FID / KID need two images), got {self.scenes}")
        require(self.steps >= 1 and self.start >= 0 and self.seed >= 0 and self.size >= 0 and self.asym_steps >= 0,
                "--steps must be >= 1; --start, --seed, --size and asym_steps >= 0")
        require(self.size == 0 or self.size % 8 == 0, f"--size must be a multiple of 8, got {self.size}")
        require(self.grid_scenes >= 1 and self.images_per_condition >= 1,
                "grid_scenes and images_per_condition must be >= 1")
        require(self.protocol in PROTOCOLS, f"unknown protocol '{self.protocol}'; choose one of {', '.join(PROTOCOLS)}")
        require(self.optimize in TIERS, f"unknown optimize tier '{self.optimize}'; choose from {', '.join(TIERS)}")
        for c in self.controls:
            require(c == NONE or c in CONTROL_TYPES, f"unknown control type '{c}'; choose from {NONE}, "
                                                     f"{', '.join(CONTROL_TYPES)}")
        for s in self.prompt_styles:
            require(s in PROMPT_STYLES, f"unknown prompt style '{s}'; choose from {', '.join(PROMPT_STYLES)}")
        for m in self.modes:
            name, options = parse_mode(m)
            require(name == "auto" or name in available(), f"unknown mode '{name}'; choose from auto, {', '.join(available())}")
            if name != "auto":
                try:  # unknown options fail here, before anything runs
                    make_injection(name, **options)
                except TypeError:
                    raise ControlstackError(f"mode '{m}': '{name}' takes no option(s) {', '.join(options)}") from None
        for c in self.cfg:
            require(1.0 <= c <= 30.0, f"--cfg values must be in [1, 30], got {c}")
        require(self.scheduler in SCHEDULERS, f"unknown scheduler '{self.scheduler}'; choose from {', '.join(SCHEDULERS)}")
        for m in self.models:
            require(m in MODEL_KINDS or Path(m).exists(), f"model '{m}' is neither {', '.join(MODEL_KINDS)} nor a path")
        require(self.controls and self.models and self.modes and self.cfg and self.prompt_styles,
                "controls, models, modes, cfg and prompt_styles each need at least one value")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> EvaluateConfig:
        values = read_yaml(path)
        check_keys(cls, values)
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def rows(self) -> list[dict]:
        """The grid's cells: {model, control, mode, cfg, prompt_style}; no-control rows once per CFG × style."""
        out = []
        for c in self.controls:
            for model in (["base"] if c == NONE else self.models):
                for mode in (["-"] if c == NONE else self.modes):
                    for cfg in self.cfg:
                        for style in self.prompt_styles:
                            out.append({"model": model, "control": None if c == NONE else c, "mode": mode,
                                        "cfg": cfg, "prompt_style": style})
        return out


def parse_mode(spec: str) -> tuple[str, dict]:
    """``controlnet:layer_weights=uniform`` -> ("controlnet", {"layer_weights": "uniform"}); numbers
    become floats (``mi:lambda_max=20``); several options are separated by ``;``."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(";")):
        key, eq, value = item.partition("=")
        require(eq and key, f"mode '{spec}': give options as NAME:KEY=VALUE (e.g. controlnet:layer_weights=uniform)")
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    return name, options


def row_key(row: dict) -> str:
    """A folder name for a row: readable, and unique (a path model adds a short hash)."""
    model = row["model"]
    if model not in (*MODEL_KINDS, "base"):
        model = Path(model).stem[:24] + "-" + hashlib.sha256(model.encode()).hexdigest()[:6]
    parts = [model, row["control"] or NONE, *([row["mode"]] if row["control"] else []), f"cfg{row['cfg']:g}",
             row["prompt_style"]]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def prompt_for(style: str, caption: str) -> str:
    return {"empty": "", "brief": brief_caption(caption), "full": caption}[style]


def controlnet_name(row: dict) -> str:
    """The ControlNet a control row uses: a bundled name (``canny``, ``mi-canny``, ``omni``) or its path."""
    c, model = row["control"], row["model"]
    return {"plain": c, "mi": f"mi-{c}", "omni": "omni"}.get(model, model)


def control_for(row: dict, condition: Image.Image):
    """The row's :class:`~controlstack.Control` for a condition image (Omni: with the type's task)."""
    task = OMNI_TASK.get(row["control"], row["control"]) if row["model"] == "omni" else None
    return Control(controlnet_name(row), condition, task=task)


def dataset_scenes(path: str, n: int, size: int, start: int, controls) -> list[dict]:
    """Rows ``start .. start + n`` of a user's ``datasets`` folder as scenes: ``image`` and ``text``, and a
    column per control type evaluated (``controlstack dataset build`` makes such folders); each image
    crop-and-resized to ``size``. A ``keypoints`` column (OpenPose JSON) enables pose PCK."""
    need = ["image", "text", *[c for c in controls if c != NONE]]
    try:
        from datasets import load_from_disk  # local: heavy, only this path needs it

        names = load_from_disk(path).column_names
    except (FileNotFoundError, ValueError):
        raise ControlstackError(f"--data '{path}' is not a datasets folder (save_to_disk); build one with "
                                "`controlstack dataset build`") from None
    missing = [c for c in need if c not in names]
    require(not missing, f"--data '{path}' has no column {', '.join(missing)} (it has {', '.join(names)}); "
                         "evaluate the control types it holds")
    columns = {c: c for c in need + (["keypoints"] if "keypoints" in names else [])}
    rows = load_image_dataset(path, columns)
    require(len(rows) >= start + n, f"--data '{path}' has {len(rows)} rows; --start {start} + --scenes {n} is more")
    out = []
    for i in range(start, start + n):
        row = rows[i]
        scene = {"text": str(row["text"]), **({"keypoints": row["keypoints"]} if "keypoints" in row else {})}
        for c in need[:1] + need[2:]:
            scene[c] = np.asarray(resize_image(row[c].convert("RGB"), size, size, "crop_and_resize"))
        out.append(scene)
    return out


def held_out_scenes(n: int, size: int, start: int = 0) -> list[dict]:
    """The renders (every column) of held-out world scenes ``[HELD_OUT_SEED, start + i]``, i < n."""
    from controlstack.world import (  # local: heavy, only this path needs it
        HELD_OUT_SEED,
        WorldConfig,
        render,
        sample_scene,
    )

    return [render(sample_scene([HELD_OUT_SEED, start + i], WorldConfig(size=size)), size) for i in range(n)]


def call_mode(row: dict) -> tuple[str | None, dict | None]:
    """The (mode, mode_options) a row passes to the pipeline: ``auto`` -> (None, None), the models'
    recommendation; an explicit mode -> its own options, ``{}`` when none are given, so that
    ``controlnet`` means the mode's defaults even where a model recommends other options."""
    mode, options = parse_mode(row["mode"])
    return (None, None) if mode in ("auto", "-") else (mode, options)


def _settings(config: EvaluateConfig, pipe, row: dict, size: int) -> dict:
    """What a cached image depends on besides its row -- including the mode and options the pipeline
    resolves, which a model's recommendation can change: a change regenerates the row."""
    mode, options = call_mode(row)
    probe = [] if row["control"] is None else [control_for(row, Image.new("RGB", (8, 8)))]
    resolved = pipe.settings(probe, config.steps, row["cfg"], mode, options)
    probe = pipe.with_windows(probe)
    return {"row": row, "steps": config.steps, "scheduler": config.scheduler, "size": size, "seed": config.seed,
            "start": config.start, "data": config.data or "world", "base": config.base or "bundle", "model_hash": pipe.model_hash,
            **({"optimize": pipe.tier.describe()} if pipe.tier.name != "parity" else {}),
            "resolved": {"mode": resolved["mode"], "mode_options": resolved["mode_options"],
                         **({"window": [probe[0].start, probe[0].end]} if probe else {})}}


def generate_row(pipe, config: EvaluateConfig, row: dict, scenes: list[dict], folder: Path, size: int, bar) -> list[np.ndarray]:
    """The row's images (from the cache when its settings match), as uint8 arrays."""
    settings = _settings(config, pipe, row, size)
    record = folder / "settings.json"
    if record.is_file() and json.loads(record.read_text()) != settings:
        for old in folder.glob("*.png"):  # made with other settings: stale, never mixed in
            old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=1))
    images = []
    for i, scene in enumerate(scenes):
        path = folder / f"{i:04d}.png"
        if not path.is_file():
            controls = [] if row["control"] is None else [control_for(row, Image.fromarray(scene[row["control"]]).convert("RGB"))]
            mode, options = call_mode(row)
            image = pipe(prompt_for(row["prompt_style"], scene["text"]), controls, steps=config.steps, cfg=row["cfg"],
                         seed=config.seed + i, width=size, height=size, scheduler=config.scheduler,
                         mode=mode, mode_options=options, progress=False)[0]
            tmp = path.with_suffix(".tmp.png")
            image.save(tmp)
            os.replace(tmp, path)  # a killed run never leaves half a PNG behind
        images.append(np.asarray(Image.open(path).convert("RGB")))
        bar.update(1)
    return images


def measure_row(row: dict, images, scenes, captions, fid_kid, scorer, config: EvaluateConfig, predictor) -> dict:
    """One row's numbers; ``fid_kid`` is a :class:`~controlstack.evaluation.quality.FidKid` of the real renders."""
    out = {**row, **fid_kid(images), "clip_score": clip_score(scorer, images, captions)}
    types = [row["control"]] if row["control"] else [c for c in config.controls if c != NONE]
    fidelity: dict = {}
    for c in types:
        if not supported(c):
            continue
        meter = FidelityMeter(c, predictor, config.protocol)
        if c == "pose" and "keypoints" not in scenes[0]:  # a user's data without keypoints: no PCK
            continue
        for g, s in zip(images, scenes):
            meter.add(g, s[c], instances(s["keypoints"], "pose") if c == "pose" else None)
        res = meter.result()
        tv = res.pop("tv")
        fidelity.update(res if row["control"] else {f"{c}.{k}": v for k, v in res.items()})
        fidelity["tv"] = tv
    out["fidelity"] = fidelity
    return out


def run(config: EvaluateConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Generate (or reuse), measure and report the grid; returns the metrics.json dict::

        {"rows": [{"model", "control" (None for none), "mode", "cfg", "prompt_style",
                   "fid", "kid", "clip_score", "fidelity": {metric: value}}],
         "reference": {"clip_real_matched", "clip_real_shuffled", "fid_real_split", "kid_real_split", "tv_real"},
         "config": {...}, "scenes": N, "size": S, "networks": {"features", "clip"},
         "sample": {"feature_dim", "fid_min_scenes", "fid_reliable"}, "notes": [one-line caveats]}

    Below ``quality.fid_min_scenes`` scenes it logs one warning before generating (and notes it)."""
    out = output_folder(out_dir)
    network = load_feature_extractor(config.features or None, allow_torchscript=config.trust_torchscript)
    scorer = ClipScorer.load(config.clip or None)
    pipe = Pipeline.from_pretrained(config.base or None).optimize(config.optimize)
    rows = config.rows()
    _check_models(pipe, rows)
    size = config.size or pipe.native_size
    scenes = (dataset_scenes(config.data, config.scenes, size, config.start, config.controls) if config.data
              else held_out_scenes(config.scenes, size, config.start))
    small = small_sample_note(len(scenes), network.num_features)
    if small:  # before the long part, so a user can stop and ask for more scenes
        logging.getLogger("controlstack").warning(small)
    real = [np.asarray(s["image"]) for s in scenes]  # the reference set: each real image once
    real_captions = [s["text"] for s in scenes]
    scenes = [s for s in scenes for _ in range(config.images_per_condition)]  # image k of scene i: its own seed
    captions = [s["text"] for s in scenes]
    folder = assets.predictor_folder()
    predictor = assets.load_predictor(folder) if folder is not None else None

    images: dict[str, list[np.ndarray]] = {}
    # every prompt is a held-out scene's own caption (or its brief form): no length warnings
    with project_prompts(), tqdm(total=len(rows) * len(scenes), desc="evaluate", unit="image",
                                 disable=not progress) as bar:
        for row in rows:
            key = row_key(row)
            bar.set_postfix_str(key)
            images[key] = generate_row(pipe, config, row, scenes, out / "images" / key, size, bar)
    against_real = FidKid(network, real)  # the real renders' features, once for every row
    measured = [measure_row(row, images[row_key(row)], scenes, captions, against_real, scorer, config, predictor)
                for row in tqdm(rows, desc="measure", unit="row", disable=not progress)]
    if config.asym_steps:
        _add_asym(pipe, config, measured, progress)
    ref = reference(network, scorer, real, real_captions)
    ref["tv_real"] = float(np.mean([total_variation(r) for r in real]))
    kids = [r["kid"] for r in measured] + [ref["kid_real_split"]]
    notes = [n for n in (small, KID_NOTE if any(k < 0 for k in kids) else None) if n]
    report = {"rows": measured, "reference": ref, "config": _portable(asdict(config)), "scenes": len(real),
              "images": len(scenes),
              "size": size, "networks": {"features": config.features or "bundled", "clip": config.clip or "bundled"},
              "sample": {"feature_dim": int(network.num_features), "fid_min_scenes": fid_min_scenes(network.num_features),
                         "fid_reliable": small is None},
              "notes": notes}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, out / "metrics.json")
    write_report(report, scenes, [images[row_key(row)] for row in rows], out / "report.html",
                 grid_scenes=config.grid_scenes)
    return report


def _check_models(pipe, rows: list[dict]) -> None:
    """Every row's ControlNet exists before anything is generated (one line naming the first missing)."""
    for row in rows:
        if row["control"] is None:
            continue
        model, name = row["model"], controlnet_name(row)
        if model in MODEL_KINDS:
            require(name in pipe.controlnets, f"model '{model}' needs the ControlNet '{name}', which this base "
                                              f"does not have; it has {', '.join(pipe.controlnets) or 'none'}")


def _add_asym(pipe, config: EvaluateConfig, measured: list[dict], progress: bool) -> None:
    done: dict = {}
    for row in measured:
        if row["control"] is None:
            continue
        if row["model"] == "omni":
            continue  # Omni's branch needs its task token: not what measure_asym feeds it
        name = controlnet_name(row)
        key = (name, row["mode"])
        if key not in done:
            mode, options = parse_mode(row["mode"])
            r = measure_asym(pipe, name, condition=row["control"], batch=4, steps=config.asym_steps, seed=config.seed,
                             mode=None if mode == "auto" else mode, mode_options=options, progress=progress)
            done[key] = {"asym": r.asym, "nasym": r.nasym}
        row["fidelity"].update(done[key])


def _portable(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
