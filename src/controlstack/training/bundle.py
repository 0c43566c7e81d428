"""Train the bundled default model, stage by stage: world -> VAE -> base -> one ControlNet per condition.

``make bundle`` (= ``python -m controlstack.training.bundle``) runs the stages in order. A stage is
*done* when its final weights are in the package's bundle folder (``controlstack/assets/bundle``,
fp16 safetensors, committed to the repository); done stages are skipped, so on a fresh clone with
a partly trained bundle the next stage starts. A stage that was interrupted resumes from its last
checkpoint in the work folder (``outputs/bundle/<stage>``, exact resume, see ``session.py``).
Each stage is sized to finish in <= 90 minutes on a 2-core CPU (``configs/bundle/*.yaml``); its
wall time (summed over resumed runs) and machine are recorded in ``bundle/stages.json`` for the
model card.

    make bundle                                   # everything that is not done yet
    make bundle STAGES="vae base"                 # only these stages
    python -m controlstack.training.bundle --list # what is done

On a faster machine (a GPU) a stage can be sized by wall time instead of its config's
``max_steps``: ``--budget base=240 --budget controlnet=30`` first runs a short probe of the stage
(:data:`PROBE_STEPS` steps, thrown away), reads its training images/s and sets ``max_steps`` to
what fits the budget (the LR schedule is then laid out over those steps, as for a fixed count).
``--configs DIR`` reads the stage configs from another folder (``configs/bundle-gpu`` holds the
GPU batch sizes). The probe's rate and the budget are recorded with the stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from controlstack import training
from controlstack.assets import BUNDLE_DIR, write_checksums
from controlstack.errors import ControlstackError
from controlstack.io.settings import SETTINGS, read_settings, write_settings
from controlstack.training.bundle_cards import write_model_card
from controlstack.training.config import read_yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "bundle"
REPO_ROOT = Path(__file__).resolve().parents[3]  # src/controlstack/training/bundle.py -> the checkout
CONTROLNETS = ("canny", "depth", "seg", "pose")
# Minimal Impact ControlNets (docs/mi.md), each fine-tuned from the bundled plain one: stage 1
# (rebalanced data + mi injection) then stage 2 (+ conservativity). The ablation's "+ data
# rebalancing" model (sum injection) is trained for MI_ABLATION only.
MI_CONTROLNETS = ("canny", "seg", "depth", "pose")
MI_ABLATION = ("canny", "seg")
WORLD_SCENES, WORLD_SIZE, WORLD_SEED = 20000, 128, 0  # evaluation: world.HELD_OUT_SEED
#: how the bundle's plain (and Omni) ControlNets are sampled best (docs/training.md, "control modes"):
#: control on the conditional CFG half, uniform layer weights; written into their controlstack.json
BUNDLE_RECOMMENDED = {"mode": "controlnet", "mode_options": {"layer_weights": "uniform"}}
PROBE_STEPS = 40  # steps of a budget probe: past the first steps' warm-up, short next to any budget


@dataclass
class Stage:
    name: str
    recipe: str                 # a training recipe (vae | base | controlnet | ...) or world
    target: Path                # the file whose presence means "done"
    condition: str = ""         # for ControlNet stages
    init_from: Path | None = None  # a refining stage starts from this bundled model
    config: str = ""            # config file name (default: the recipe's, or the stage's)
    dest: Path | None = None    # ControlNet stages: the folder the fp16 model goes to
    base: Path | None = None    # ControlNet stages: the base they train for (None: the bundle's U-Net base)


def stages(bundle: Path = BUNDLE_DIR) -> list[Stage]:
    out = [
        Stage("world", "world", Path()),  # target set by the plan (work folder)
        Stage("vae", "vae", bundle / "vae" / "diffusion_pytorch_model.safetensors"),
        # the decoder fine-tuned on noisy latents (encoder frozen): done when recorded in stages.json
        Stage("vae-decoder", "vae", bundle / "stages.json", init_from=bundle / "vae"),
        # v-prediction from the first step, so no separate ε-to-v stage (configs/bundle/base.yaml says why)
        Stage("base", "base", bundle / "unet" / "diffusion_pytorch_model.safetensors"),
    ]
    out += [Stage(f"controlnet-{c}", "controlnet", bundle / "controlnets" / c / "diffusion_pytorch_model.safetensors", c)
            for c in CONTROLNETS]
    weights = "diffusion_pytorch_model.safetensors"
    for c in MI_CONTROLNETS:
        plain, stage1, final = bundle / "controlnets" / c, bundle / "mi" / f"{c}-stage1", bundle / "controlnets" / f"mi-{c}"
        if c in MI_ABLATION:
            ablation = bundle / "mi" / f"{c}-rebalance"
            out.append(Stage(f"mi-{c}-rebalance", "controlnet", ablation / weights, c, plain, "mi_rebalance", ablation))
        out.append(Stage(f"mi-{c}-stage1", "controlnet", stage1 / weights, c, plain, "mi_stage1", stage1))
        out.append(Stage(f"mi-{c}", "controlnet", final / weights, c, stage1, "mi_stage2", final))
    # OmniControlNet (docs/omni.md): one ControlNet for every condition type, warm-started from the
    # bundled canny ControlNet (its zero convolutions have grown already; the budget is 1/7 per task)
    # OmniControlNet's stage 1: the multi-task dense predictor behind the learned annotators
    out.append(Stage("predictor", "predictor", bundle / "predictor" / "model.safetensors", dest=bundle / "predictor"))
    omni = bundle / "controlnets" / "omni"
    out.append(Stage("omni", "omni", omni / weights, "omni", bundle / "controlnets" / "canny", "omni", omni))
    # the networks FID / KID and CLIP score look through (evaluation/networks.py, docs/evaluation.md)
    for name, target in (("features", "model.safetensors"), ("clip", "model.safetensors")):
        dest = bundle / "evaluation" / name
        out.append(Stage(name, name, dest / target, dest=dest))
    # an IP-Adapter for the base, its image encoder the world CLIP's vision tower (docs/adapters.md)
    ip = bundle / "ip_adapter"
    out.append(Stage("ip-adapter", "ip_adapter", ip / "ip-adapter.safetensors", dest=ip))
    # a transformer base in SD3's layout and its canny ControlNet (docs/transformers.md), beside the U-Net one
    sd3 = bundle / "sd3"
    out.append(Stage("sd3-base", "base_sd3", sd3 / "transformer" / weights, config="base_sd3", dest=sd3))
    cn = sd3 / "controlnets" / "canny"
    out.append(Stage("sd3-controlnet-canny", "controlnet", cn / weights, "canny", config="controlnet_sd3", dest=cn,
                     base=sd3))
    # the base distilled into a few-step student (docs/speed.md): --model lcm
    out.append(Stage("lcm", "lcm", bundle / "lcm" / "unet" / weights, config="lcm", dest=bundle / "lcm"))
    return out


def machine() -> str:
    import torch  # local: heavy, only this path needs it

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only ({os.cpu_count()} cores)"
    return f"{cpu}; {device}; torch {torch.__version__}"


def save_fp16(model, dest: Path) -> None:
    """fp16 safetensors copy of a diffusers / transformers model (the bundle's storage format)."""
    tmp = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(dtype=__import__("torch").float16).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def halve_folder(folder: Path) -> None:
    """Every floating tensor of every ``.safetensors`` file under ``folder`` in fp16, in place."""
    from safetensors import safe_open  # local: heavy, only this path needs it
    from safetensors.torch import load_file, save_file  # local: heavy, only this path needs it

    for f in folder.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as handle:
            metadata = handle.metadata()
        state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(f)).items()}
        save_file({k: v.contiguous() for k, v in state.items()}, str(f), metadata=metadata)


def portable_configs(folder: Path) -> None:
    """Every ``config.json`` under ``folder`` with the checkout's absolute paths made relative (a saved
    model records where it was loaded from in ``_name_or_path``; the bundle is committed)."""
    for f in folder.rglob("config.json"):
        config = json.loads(f.read_text())
        portable = _portable(config)
        if portable != config:
            f.write_text(json.dumps(portable, indent=2, sort_keys=True) + "\n")


def _portable(value):
    """A config's absolute paths inside the checkout, made relative to it: the record is committed
    and read on other machines."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, str) and value.startswith(str(REPO_ROOT) + "/"):
        return value[len(str(REPO_ROOT)) + 1:]
    return value


def _record(bundle: Path, stage: str, info: dict) -> None:
    path = bundle / "stages.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[stage] = info
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


CLOCK_EVERY = 30.0  # seconds between writes of a running stage's clock


def _write_clock(clock: Path, seconds: float) -> None:
    tmp = clock.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seconds": seconds}))
    os.replace(tmp, clock)  # atomic: a kill mid-write leaves the previous value, not a torn file


def _timed_training(stage: Stage, config, work: Path) -> tuple[Path, float]:
    """Train (resuming if a checkpoint exists); returns the model folder and the total wall time
    over every run of this stage (kept in the work folder across interruptions). The clock is
    also written every :data:`CLOCK_EVERY` seconds while training: a kill from outside stops the run
    without unwinding it, and its minutes would otherwise be missing from the record."""
    _, train = training.recipe(stage.recipe)  # looked up per call: tests replace it
    work.mkdir(parents=True, exist_ok=True)
    clock = work / "wall_seconds.json"
    spent = json.loads(clock.read_text())["seconds"] if clock.is_file() else 0.0
    resume = (work / "checkpoints").is_dir() and any((work / "checkpoints").iterdir())
    t0, stop = time.time(), threading.Event()

    def tick() -> None:
        while not stop.wait(CLOCK_EVERY):
            _write_clock(clock, spent + time.time() - t0)

    threading.Thread(target=tick, daemon=True).start()
    try:
        model_dir = Path(train(config, resume=resume))
    finally:
        stop.set()
        _write_clock(clock, spent + time.time() - t0)
    return model_dir, spent + time.time() - t0


def _forget_if_base_changed(work: Path, bundle: Path) -> None:
    """A ControlNet's checkpoints belong to the base they were trained on: when the bundled U-Net
    (or transformer) changed since (e.g. the base stage ran again), resuming would continue a
    ControlNet for another base, so the stage's work folder is cleared and the stage starts over."""
    net = bundle / ("transformer" if (bundle / "transformer").is_dir() else "unet")
    digest = hashlib.sha256((net / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    stamp = work / "base_unet.sha256"
    if work.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != digest):
        print(f"{work}: checkpoints of another base; starting this stage over", flush=True)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")


_RATES: dict[tuple, float] = {}  # (recipe, batch size) -> images/s, probed once per run


def _probe_rate(stage: Stage, config, work_root: Path) -> float:
    """Training images/s of this stage's ``config`` on this machine, from a :data:`PROBE_STEPS`-step
    run in a scratch folder (no validation, one checkpoint at the end; the folder is removed). The
    ControlNet stages share one config and differ only in their hint, so one probe serves them all."""
    from controlstack.training.session import read_metric  # local: heavy, only this path needs it

    key = (stage.recipe, config.batch_size)
    if key not in _RATES:
        probe = work_root / f".probe-{stage.name}"
        shutil.rmtree(probe, ignore_errors=True)
        training.recipe(stage.recipe)[1](dataclasses.replace(
            config, output_dir=str(probe), max_steps=PROBE_STEPS, lr_warmup_steps=0, log_every=PROBE_STEPS,
            checkpoint_every=PROBE_STEPS, num_validation_images=0))
        _RATES[key] = read_metric(probe / "metrics.csv", "images_per_s")[1][-1]
        shutil.rmtree(probe, ignore_errors=True)
    return _RATES[key]


def budget_for(stage: Stage, budgets: dict[str, float]) -> float | None:
    """A stage's budget in seconds: by stage name, else by recipe name (``controlnet=30`` sizes
    every ControlNet stage)."""
    return budgets.get(stage.name, budgets.get(stage.recipe))


def run_stage(stage: Stage, work_root: Path, bundle: Path, configs: Path | None = None,
              budgets: dict[str, float] | None = None) -> None:
    world = work_root / "world"
    work = work_root / stage.name
    if stage.recipe == "world":
        from controlstack.world import WorldConfig  # local: heavy, only this path needs it
        from controlstack.world.export import export_dataset  # local: heavy, only this path needs it

        export_dataset(world, scenes=WORLD_SCENES, seed=WORLD_SEED, config=WorldConfig(size=WORLD_SIZE),
                       workers=max(1, min(os.cpu_count() or 1, 16)))
        return
    config_cls, _ = training.recipe(stage.recipe)
    overrides = {"data": str(world), "output_dir": str(work)}
    if stage.init_from is not None:
        overrides["init_from"] = str(stage.init_from)
    if stage.recipe in ("base", "base_sd3", "controlnet", "omni", "ip_adapter", "lcm"):
        # one cache of the (locked, bundled) VAE's posteriors serves the base and every ControlNet
        overrides["latent_cache"] = str(work_root / "latents.safetensors")
    if stage.recipe in ("base", "base_sd3"):
        overrides["vae"] = str(bundle / "vae")
    if stage.recipe == "ip_adapter":
        overrides.update(base=str(bundle), image_encoder=str(bundle / "evaluation" / "clip"))
        _forget_if_base_changed(work, bundle)
    yaml_name = stage.config or ("controlnet" if stage.recipe == "controlnet" else stage.name.replace("-", "_"))
    yaml_path = Path(configs or CONFIGS) / f"{yaml_name}.yaml"
    if stage.recipe == "lcm":  # distilled under the bundled ControlNets its config names (training/lcm.py)
        controls = read_yaml(yaml_path).get("controls") or ()
        overrides.update(teacher=str(bundle), controlnets=[str(bundle / "controlnets" / c) for c in controls])
        _forget_if_base_changed(work, bundle)
    if stage.recipe in ("controlnet", "omni"):
        base = stage.base or bundle
        overrides.update(base=str(base), **({"condition": stage.condition} if stage.recipe == "controlnet" else {}))
        _forget_if_base_changed(work, base)
    config = config_cls.from_yaml(yaml_path, resolution=WORLD_SIZE, **overrides)
    sized = {}
    budget = budget_for(stage, budgets or {})
    if budget is not None and not (work / "checkpoints").is_dir():  # a resumed stage keeps its step count
        rate = _probe_rate(stage, config, work_root)
        config = dataclasses.replace(config, max_steps=max(PROBE_STEPS, int(budget * rate / config.batch_size)))
        sized = {"budget_seconds": budget, "probe_images_per_s": round(rate, 1)}
        print(f"{stage.name}: {rate:.0f} img/s in the probe -> {config.max_steps} steps "
              f"for {budget:.0f} s", flush=True)
    model_dir, seconds = _timed_training(stage, config, work)

    bundle.mkdir(parents=True, exist_ok=True)
    if stage.recipe == "vae":
        from diffusers import AutoencoderKL  # local: heavy, only this path needs it

        save_fp16(AutoencoderKL.from_pretrained(model_dir), bundle / "vae")
    elif stage.recipe == "predictor":
        from controlstack.models.predictor import (  # local: heavy, only this path needs it
            load_predictor,
            save_predictor,
        )

        tmp = bundle / ".predictor.partial"
        save_predictor(load_predictor(model_dir), tmp, dtype=__import__("torch").float16)
        shutil.rmtree(stage.dest, ignore_errors=True)
        tmp.rename(stage.dest)
    elif stage.recipe in ("features", "clip"):  # small: copied as trained (fp32), card written below
        tmp = bundle / f".{stage.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp)
        shutil.rmtree(stage.dest, ignore_errors=True)
        stage.dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(stage.dest)
    elif stage.recipe == "ip_adapter":  # the adapter in fp16 as every bundled weight; its encoder as trained
        from safetensors.torch import load_file, save_file  # local: heavy, only this path needs it

        tmp = bundle / ".ip-adapter.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp)
        state = load_file(str(model_dir / "ip-adapter.safetensors"))
        save_file({k: v.half() for k, v in state.items()}, str(tmp / "ip-adapter.safetensors"))
        shutil.rmtree(stage.dest, ignore_errors=True)
        tmp.rename(stage.dest)
    elif stage.recipe == "base_sd3":  # the pipeline folder as exported, every weight in fp16
        tmp = bundle / ".sd3.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp)
        halve_folder(tmp)
        portable_configs(tmp)
        stage.dest.mkdir(parents=True, exist_ok=True)
        for part in tmp.iterdir():  # part by part: the ControlNets trained for it (sd3/controlnets/) stay
            target = stage.dest / part.name
            if target.is_dir():
                shutil.rmtree(target)
            shutil.move(str(part), target)
        shutil.rmtree(tmp)
    elif stage.recipe == "lcm":  # the student's U-Net (fp16) and sampler; the rest is the bundled base's
        from diffusers import UNet2DConditionModel  # local: heavy, only this path needs it

        tmp = bundle / ".lcm.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        save_fp16(UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"), tmp / "unet")
        shutil.copytree(model_dir / "scheduler", tmp / "scheduler")
        student = _portable(read_settings(model_dir))  # its record names the teacher inside the checkout
        # the base's recommendations (its ControlNets' mode) with the student's sampler, steps and CFG
        write_settings(tmp, {**student, "recommended": {**read_settings(bundle).get("recommended", {}),
                                                        **student["recommended"]}})
        shutil.rmtree(stage.dest, ignore_errors=True)
        tmp.rename(stage.dest)
    elif stage.recipe == "base":
        from diffusers import UNet2DConditionModel  # local: heavy, only this path needs it
        from transformers import CLIPTextModel  # local: heavy, only this path needs it

        save_fp16(UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"), bundle / "unet")
        save_fp16(CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder"), bundle / "text_encoder")
        for part in ("tokenizer", "scheduler"):
            shutil.rmtree(bundle / part, ignore_errors=True)
            shutil.copytree(model_dir / part, bundle / part)
        shutil.copy(model_dir / "model_index.json", bundle / "model_index.json")
    else:
        from controlstack.io.checkpoints import load_controlnet  # local: heavy, only this path needs it

        dest = stage.dest or bundle / "controlnets" / stage.condition
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_fp16(load_controlnet(model_dir), dest)
        from controlstack.models.task_tokens import TOKENS_FILE  # local: heavy, only this path needs it

        for name in (SETTINGS, TOKENS_FILE):  # the recommended mode / Omni's task tokens travel with the weights
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, dest / name)

        settings = read_settings(dest)
        # the measured best mode: on the U-Net bundle (benchmarks/fidelity.py) and on the SD3-layout one
        # (benchmarks/sd3_fidelity.py: edge F1 0.581 in controlnet mode vs 0.357 balanced)
        if "recommended" not in settings:
            write_settings(dest, {**settings, "recommended": BUNDLE_RECOMMENDED})
    _record(bundle, stage.name, {
        "recipe": stage.recipe, "condition": stage.condition or None, "steps": config.max_steps,
        **({"dest": str(stage.dest.relative_to(bundle))} if stage.dest else {}),
        "batch_size": config.batch_size, "resolution": config.resolution, "wall_seconds": round(seconds),
        "machine": machine(), "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": _portable(config.to_dict()), "data": f"world export: {WORLD_SCENES} scenes, seed {WORLD_SEED}, "
                                           f"{WORLD_SIZE}x{WORLD_SIZE}", **sized,
    })


def is_done(stage: Stage, work_root: Path) -> bool:
    if stage.recipe == "world":
        return (work_root / "world" / "dataset_info.json").is_file()
    if stage.target.name == "stages.json":  # a stage that refines another stage's files
        return stage.target.is_file() and stage.name in json.loads(stage.target.read_text())
    return stage.target.is_file()


def run(names: list[str] | None, work_root: Path, bundle: Path = BUNDLE_DIR, list_only: bool = False,
        configs: Path | None = None, budgets: dict[str, float] | None = None) -> None:
    """Run the named stages (default: all) that are not done, in order."""
    plan = stages(bundle)
    known = [s.name for s in plan]
    for n in names or []:
        if n not in known:
            raise ControlstackError(f"unknown stage '{n}'; choose from {', '.join(known)}")
    recipes = sorted({s.recipe for s in plan} - {"world"})  # the world export has no steps to size
    for n in budgets or {}:
        if n not in known and n not in recipes:
            raise ControlstackError(f"--budget: unknown stage '{n}'; give a stage ({', '.join(known)}) "
                                    f"or a recipe ({', '.join(recipes)})")
    configs = Path(configs or CONFIGS)
    if not configs.is_dir():
        raise ControlstackError(f"--configs: folder '{configs}' not found")
    for stage in plan:
        done = is_done(stage, work_root)
        if list_only:
            print(f"{stage.name:22s} {'done' if done else 'to do'}")
        elif not done and (not names or stage.name in names):
            print(f"== stage {stage.name} ==", flush=True)
            run_stage(stage, work_root, bundle, configs, budgets)
            if stage.recipe != "world":
                write_checksums(bundle)
                write_model_card(bundle)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the bundled default model stage by stage.")
    ap.add_argument("--stages", nargs="*", default=None, help="stage names (default: all not done)")
    ap.add_argument("--work", default="outputs/bundle", help="work folder (datasets, checkpoints)")
    ap.add_argument("--list", action="store_true", help="print each stage and whether it is done")
    ap.add_argument("--bundle", default=str(BUNDLE_DIR),
                    help="bundle folder the stages write to (default: the package's; another folder "
                         "builds a new bundle beside the shipped one)")
    ap.add_argument("--configs", default=None,
                    help="folder of stage configs (default: the package's configs/bundle)")
    ap.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                    help="size a stage (or every stage of a recipe: base, controlnet) to this many seconds "
                         "of training on this machine, from a short probe; repeatable")
    args = ap.parse_args(argv)
    try:
        budgets = {}
        for item in args.budget:
            name, _, value = item.partition("=")
            try:
                budgets[name] = float(value)
            except ValueError:
                raise ControlstackError(f"--budget '{item}': give STAGE=SECONDS, e.g. base=240") from None
            if not budgets[name] > 0:
                raise ControlstackError(f"--budget '{item}': seconds must be positive")
        run(args.stages, Path(args.work), Path(args.bundle), list_only=args.list, configs=args.configs,
            budgets=budgets)
    except ControlstackError as exc:
        print(f"bundle: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
