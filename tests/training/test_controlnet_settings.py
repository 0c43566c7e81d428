"""What the ControlNet recipe writes beside the weights: the recommendation it trained under
(``controlstack.json``), so a ControlNet someone trains is sampled as its parents are; and the
shipped first-fine-tune config, which must run on a fresh clone."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from controlstack import Control, assets
from tests.training.conftest import tiny_controlnet_config

ROOT = Path(__file__).resolve().parents[2]
FINETUNE = ROOT / "src" / "controlstack" / "configs" / "train" / "finetune-canny.yaml"
UNIFORM = {"mode": "controlnet", "mode_options": {"layer_weights": "uniform"}}
NO_VALIDATION = {"max_steps": 1, "num_validation_images": 0, "checkpoint_every": 1}


def _settings(model) -> dict | None:
    path = Path(model) / "controlstack.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.fixture(scope="module")
def declaring_base(tiny_base_dir, tmp_path_factory):
    """The tiny base with a controlstack.json that declares its ControlNets' mode (and a cfg)."""
    path = tmp_path_factory.mktemp("declaring") / "model"
    shutil.copytree(tiny_base_dir, path)
    (path / "controlstack.json").write_text(json.dumps({"recommended": {**UNIFORM, "cfg": 3.0}}))
    return str(path)


@pytest.fixture(scope="module")
def parent(tiny_base_dir, tmp_path_factory):
    """A ControlNet of the tiny base that declares a mode and a window (the one to fine-tune)."""
    from controlstack.training.controlnet import build_controlnet, load_base

    base = load_base(tiny_base_dir)
    path = tmp_path_factory.mktemp("parent") / "cn"
    build_controlnet(base.unet, base.vae, (8, 8, 8, 8)).save_pretrained(path)
    (path / "controlstack.json").write_text(json.dumps({"recommended": {"mode": "prompt", "end": 0.8}}))
    return str(path)


def test_a_finetuned_controlnet_keeps_its_parents_recommendation(world_dir, declaring_base, parent, tmp_path):
    from controlstack.training.controlnet import train

    model = train(tiny_controlnet_config(world_dir, declaring_base, tmp_path / "cn", init_from=parent,
                                         **NO_VALIDATION))
    # init_from's wins over the base's, its window travels with it
    assert _settings(model)["recommended"] == {"mode": "prompt", "end": 0.8}


def test_a_fresh_controlnet_takes_the_mode_its_base_declares(world_dir, declaring_base, tiny_base_dir, tmp_path):
    from controlstack.pipeline import Pipeline
    from controlstack.training.controlnet import train

    model = train(tiny_controlnet_config(world_dir, declaring_base, tmp_path / "cn", **NO_VALIDATION))
    # the ControlNet part only (cfg stays the base's), and the condition preprocess=True annotates with
    assert _settings(model) == {"recommended": UNIFORM, "training": {"condition": "canny"}}
    # sampled on a base that declares nothing, it still resolves to that mode by itself
    pipe = Pipeline.from_pretrained(tiny_base_dir)
    hint = np.zeros((32, 32, 3), np.uint8)
    assert pipe.settings([Control(model, hint)], None, None, None, None)["mode"] == "controlnet"
    # neither the base nor init_from declares anything: no recommendation (the defaults apply)
    plain = train(tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "plain", **NO_VALIDATION))
    assert _settings(plain) == {"training": {"condition": "canny"}}


def test_an_omni_controlnet_records_its_tasks_and_inherits_the_recommendation(world_dir, declaring_base, tmp_path):
    from controlstack.training.omni import OmniConfig, train

    cfg = OmniConfig(**(tiny_controlnet_config(world_dir, declaring_base, tmp_path / "omni").to_dict()
                        | {"tasks": ("canny", "depth"), "condition": "omni"} | NO_VALIDATION))
    # as the bundled omni's controlstack.json: its tasks and the mode it is sampled in
    assert _settings(train(cfg)) == {"omni": {"tasks": ["canny", "depth"]}, "recommended": UNIFORM}


def test_the_first_finetune_config_runs_on_a_fresh_clone(world_dir, tmp_path):
    """The shipped recipe validates, names only what a fresh clone has (the bundled base and canny)
    besides the data the README's export command writes, and its output recommends the bundled
    canny's mode -- here for 1 step at 32 px on the test's tiny world."""
    from controlstack.training.controlnet import ControlNetConfig, train

    cfg = ControlNetConfig.from_yaml(FINETUNE)
    assert (ROOT / cfg.base).resolve() == assets.BUNDLE_DIR.resolve()
    assert (ROOT / cfg.init_from).resolve() == (assets.BUNDLE_DIR / "controlnets" / "canny").resolve()
    readme = (ROOT / "README.md").read_text()
    assert f"--out {cfg.data}" in readme and f"--config {FINETUNE.relative_to(ROOT)}" in readme
    if assets.is_placeholder():
        pytest.skip("no trained bundle in this checkout")
    values = yaml.safe_load(FINETUNE.read_text())
    values |= {"base": str(ROOT / cfg.base), "init_from": str(ROOT / cfg.init_from), "data": world_dir,
               "output_dir": str(tmp_path / "ft"), "resolution": 32, "batch_size": 2, "mixed_precision": "no",
               **NO_VALIDATION}
    model = train(ControlNetConfig.from_dict(values))
    assert _settings(model)["recommended"] == {**UNIFORM, "start": 0.5} == json.loads(
        (assets.BUNDLE_DIR / "controlnets" / "canny" / "controlstack.json").read_text())["recommended"]


def test_training_output_has_no_torchvision_fallback_notes(world_dir, tiny_base_dir, tmp_path):
    """transformers notes that its image processors fall back to PIL when diffusers' pipeline modules
    are imported (validation sampling) without torchvision; the recipes never use them."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here: transformers has nothing to note")
    config = tmp_path / "cn.yaml"
    values = tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "cn", max_steps=1, validate_every=1).to_dict()
    config.write_text(yaml.safe_dump(values))
    proc = subprocess.run([sys.executable, "-m", "controlstack.cli.main", "train", "controlnet", "--config",
                           str(config)], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cn" / "samples" / "step-0000001.png").is_file()  # the pipeline import did happen
    assert not re.search(r"torchvision|ImageProcessor", proc.stderr), proc.stderr


def test_a_plain_finetune_of_an_mi_model_does_not_keep_its_mi_mode(tmp_path, declaring_base):
    from controlstack.io.settings import inherited

    parent = tmp_path / "mi"
    parent.mkdir()
    (parent / "controlstack.json").write_text(json.dumps(
        {"recommended": {"mode": "mi", "mode_options": {"reduce": "layer"}}, "training": {"injection": "mi"}}))
    assert inherited(parent, declaring_base, "mi") == {"mode": "mi", "mode_options": {"reduce": "layer"}}
    assert inherited(parent, declaring_base, "sum") == UNIFORM  # the base's, not the parent's mi
