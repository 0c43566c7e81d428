"""Configs validate on construction; the CLI turns bad configs into one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from controlstack.errors import ControlstackError
from controlstack.training.base import BaseConfig
from controlstack.training.controlnet import ControlNetConfig
from controlstack.training.lcm import LCMConfig
from controlstack.training.vae import VAEConfig

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "controlstack" / "configs" / "train"


def test_unknown_key_is_named():
    with pytest.raises(ControlstackError, match="unknown config key 'lerning_rate'"):
        VAEConfig.from_dict({"data": "d", "lerning_rate": 1e-4})


@pytest.mark.parametrize("values, message", [
    ({"batch_size": 0}, "'batch_size' must be >= 1"),
    ({"batch_size": "8"}, "'batch_size' must be an integer"),
    ({"mixed_precision": "fp16"}, "'mixed_precision' is 'fp16'"),
    ({"downsampling": 16}, "'downsampling' must be 4 or 8"),
    ({"downsampling": 4, "block_out_channels": [32, 64, 64, 64]}, "needs 3 entries"),
    ({"reconstruction_loss": "lpips"}, "'reconstruction_loss'"),
    ({"learning_rate": float("nan")}, "'learning_rate' must be finite"),
])
def test_bad_vae_values(values, message):
    with pytest.raises(ControlstackError, match=message):
        VAEConfig.from_dict({"data": "d"} | values)


def test_required_paths_and_recipe_specific_checks():
    with pytest.raises(ControlstackError, match="'data' is missing"):
        VAEConfig()
    with pytest.raises(ControlstackError, match="'vae' is missing"):
        BaseConfig(data="d")
    with pytest.raises(ControlstackError, match="'attention_levels' must be in 1..3"):
        BaseConfig(data="d", vae="v", attention_levels=4)
    with pytest.raises(ControlstackError, match="'caption_dropout'"):
        ControlNetConfig(data="d", base="b", caption_dropout=1.5)


def test_values_are_coerced_and_round_trip(tmp_path):
    cfg = VAEConfig.from_dict({"data": "d", "learning_rate": 1, "block_out_channels": [8, 8, 8, 8],
                               "norm_num_groups": 8})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.block_out_channels == (8, 8, 8, 8)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert VAEConfig.from_yaml(tmp_path / "c.yaml") == cfg
    assert VAEConfig.from_yaml(tmp_path / "c.yaml", max_steps=7, output_dir=None).max_steps == 7


@pytest.mark.parametrize("recipe, cls", [("vae", VAEConfig), ("base", BaseConfig), ("controlnet", ControlNetConfig),
                                         ("lcm", LCMConfig)])
def test_shipped_default_configs_validate(recipe, cls):
    cfg = cls.from_yaml(CONFIGS / f"{recipe}.yaml")
    assert cfg.resolution == 128 and cfg.mixed_precision == "auto"


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    from controlstack.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": "d", "vae": "v", "layers": 3}))
    assert main(["train", "base", "--config", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown config key 'layers'" in err
    assert not (tmp_path / "out").exists()
    assert main(["train", "vae", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    bad.write_text("data: [unclosed")
    assert main(["train", "vae", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


BUNDLE_CONFIGS = CONFIGS.parent / "bundle"


@pytest.mark.parametrize("name, cls, overrides", [
    ("vae", VAEConfig, {}),
    ("vae_decoder", VAEConfig, {"init_from": "v"}),
    ("base", BaseConfig, {"vae": "v"}),
    ("controlnet", ControlNetConfig, {"base": "b", "condition": "canny"}),
    ("lcm", LCMConfig, {"teacher": "b", "controlnets": ["c"] * 4}),  # one per bundled control
])
def test_bundle_configs_validate_with_the_paths_make_bundle_sets(name, cls, overrides):
    cfg = cls.from_yaml(BUNDLE_CONFIGS / f"{name}.yaml", data="d", output_dir="o", resolution=128, **overrides)
    assert cfg.resolution == 128
    if name == "vae":  # the v2 VAE recipe: colour-preserving settings (docs/training.md)
        assert cfg.norm_num_groups == 4 and cfg.object_column == "instances" and cfg.object_weight > 0
    if name == "base":  # v-prediction from the first step: no separate base-v stage (docs/training.md)
        assert cfg.prediction_type == "v_prediction" and not cfg.init_from
