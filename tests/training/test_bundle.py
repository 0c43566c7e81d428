"""`make bundle` end to end at toy scale: world -> VAE -> base -> ControlNet -> Pipeline loads it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

TINY = {
    "vae": dict(max_steps=1, batch_size=2, block_out_channels=[8, 8, 8, 8], norm_num_groups=4, latent_channels=8,
                crop_size=32,
                checkpoint_every=1, validate_every=1, log_every=1, num_validation_images=1),
    "vae_decoder": dict(max_steps=1, batch_size=2, train_encoder=False, latent_noise=0.3, checkpoint_every=1,
                        validate_every=1, log_every=1, num_validation_images=1),
    "base": dict(max_steps=1, batch_size=2, block_out_channels=[16, 32], attention_levels=1, norm_num_groups=8,
                 attention_head_dim=4, text_hidden_size=32, text_layers=1, text_heads=2, max_length=16,
                 checkpoint_every=1, validate_every=1, log_every=1, num_validation_images=1,
                 num_inference_steps=2, prediction_type="v_prediction"),
    "controlnet": dict(max_steps=1, batch_size=2, hint_channels=[8, 8, 8, 8], checkpoint_every=1,
                       validate_every=1, log_every=1, num_validation_images=1, num_inference_steps=2),
}
MI = dict(max_steps=1, batch_size=2, checkpoint_every=1, validate_every=1, log_every=1, num_validation_images=0,
          rebalance_probability=1.0, injection="mi")
TINY |= {"mi_rebalance": MI | {"injection": "sum"}, "mi_stage1": MI, "mi_stage2": MI | {"conservativity_weight": 0.01}}
# OmniControlNet: the predictor (tiny Swin) and the Omni ControlNet (three tasks)
TINY |= {"predictor": dict(max_steps=1, batch_size=2, embed_dim=8, num_heads=[1, 1, 2, 2], fpn_width=8, head_width=8,
                           stem_width=4, checkpoint_every=1, validate_every=1, log_every=1, num_validation_images=1),
         "omni": dict(max_steps=1, batch_size=2, tasks=["canny", "depth", "seg"], checkpoint_every=1, validate_every=1,
                      log_every=1, num_validation_images=3, num_inference_steps=2)}
# the evaluation networks (FID / KID features, world CLIP)
TINY |= {"features": dict(max_steps=1, batch_size=2, widths=[8, 16], num_features=4, checkpoint_every=1, log_every=1),
         "clip": dict(max_steps=1, batch_size=2, width=16, layers=1, heads=2, projection_dim=8, checkpoint_every=1,
                      log_every=1)}
# the IP-Adapter (its encoder: the world CLIP above) and the SD3-layout base with its canny ControlNet
TINY |= {"ip_adapter": dict(max_steps=1, batch_size=2, num_tokens=4, resampler_width=64, checkpoint_every=1,
                            validate_every=1, log_every=1, num_validation_images=1, num_inference_steps=2),
         "base_sd3": dict(max_steps=1, batch_size=2, layers=2, heads=2, head_dim=8, text_hidden_size=32, text_layers=1,
                          text_heads=2, max_length=16, checkpoint_every=1, validate_every=1, log_every=1,
                          num_validation_images=1, num_inference_steps=2),
         "controlnet_sd3": dict(max_steps=1, batch_size=2, controlnet_layers=1, checkpoint_every=1, validate_every=1,
                                log_every=1, num_validation_images=1, num_inference_steps=2)}
# the few-step student of the base (LCM)
TINY |= {"lcm": dict(max_steps=1, batch_size=2, time_cond_proj_dim=8, checkpoint_every=1, validate_every=1, log_every=1,
                     num_validation_images=1, num_inference_steps=2, controls=["canny"], control_probability=1.0)}


def test_bundle_stages_end_to_end(tmp_path, monkeypatch):
    from controlstack.training import bundle as b

    configs = tmp_path / "configs"
    configs.mkdir()
    for name, values in TINY.items():
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.setattr(b, "CONFIGS", configs)
    monkeypatch.setattr(b, "WORLD_SCENES", 6)
    monkeypatch.setattr(b, "WORLD_SIZE", 64)
    monkeypatch.setattr(b, "CONTROLNETS", ("canny",))
    monkeypatch.setattr(b, "MI_CONTROLNETS", ("canny",))
    monkeypatch.setattr(b, "MI_ABLATION", ("canny",))
    out, work = tmp_path / "bundle", tmp_path / "work"

    b.run(["world", "vae", "vae-decoder", "base", "controlnet-canny"], work, out)
    stages = json.loads((out / "stages.json").read_text())
    assert sorted(stages) == ["base", "controlnet-canny", "vae", "vae-decoder"]
    # Minimal Impact ControlNet: both stages fine-tune the bundled plain one, stage 2 continues stage 1
    b.run(["mi-canny-rebalance", "mi-canny-stage1", "mi-canny"], work, out)
    stages = json.loads((out / "stages.json").read_text())
    assert stages["mi-canny-stage1"]["config"]["init_from"].endswith("controlnets/canny")
    assert stages["mi-canny"]["config"]["init_from"].endswith("mi/canny-stage1")
    assert stages["mi-canny"]["config"]["conservativity_weight"] == 0.01
    assert json.loads((out / "controlnets" / "mi-canny" / "controlstack.json").read_text())["recommended"]["mode"] == "mi"
    assert (out / "mi" / "canny-rebalance" / "config.json").is_file()
    mi_card = (out / "controlnets" / "mi-canny" / "README.md").read_text()
    assert "Minimal Impact ControlNet" in mi_card and "| mi-canny-stage1 |" in mi_card and "| mi-canny |" in mi_card
    # OmniControlNet: the predictor (fp16, its card) and the Omni ControlNet from the plain canny one
    b.run(["predictor", "omni"], work, out)
    stages = json.loads((out / "stages.json").read_text())
    assert stages["omni"]["config"]["init_from"].endswith("controlnets/canny")
    omni = out / "controlnets" / "omni"
    settings = json.loads((omni / "controlstack.json").read_text())
    assert settings["omni"]["tasks"] == ["canny", "depth", "seg"] and settings["recommended"]["mode"] == "controlnet"
    assert (omni / "task_tokens.safetensors").is_file() and "Omni ControlNet" in (omni / "README.md").read_text()
    assert "Multi-task dense predictor" in (out / "predictor" / "README.md").read_text()
    from controlstack.models.predictor import load_predictor

    assert load_predictor(out / "predictor").config.embed_dim == 8
    # the base's parameterisation reaches the bundle's scheduler, which every sampler reads
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    b.run(["features", "clip"], work, out)
    from controlstack.evaluation.networks import ClipScorer, load_feature_net

    assert load_feature_net(out / "evaluation" / "features").config.feature_scale > 0
    assert ClipScorer.load(out / "evaluation" / "clip").model.config.projection_dim == 8
    assert "World CLIP (evaluation)" in (out / "evaluation" / "clip" / "README.md").read_text()
    b.run(["ip-adapter", "sd3-base", "sd3-controlnet-canny"], work, out)
    assert (out / "ip_adapter" / "image_encoder" / "config.json").is_file()
    assert "IP-Adapter (plus)" in (out / "ip_adapter" / "README.md").read_text()
    from controlstack import Control, Pipeline, assets

    sd3 = Pipeline.from_pretrained(out / "sd3")
    assert sd3.family.name == "sd3"
    # the mode measured best on both bundles travels with the transformer's ControlNet too
    settings = json.loads((out / "sd3" / "controlnets" / "canny" / "controlstack.json").read_text())
    assert settings["recommended"]["mode"] == "controlnet"
    edges = np.zeros((64, 64, 3), np.uint8)
    assert sd3("a cube", [Control(str(out / "sd3" / "controlnets" / "canny"), edges)], steps=1,
               output_type="np", progress=False).shape == (1, 64, 64, 3)
    # the LCM student: its U-Net and sampler, the base's recommended mode with the student's sampler and steps
    from controlstack.io.settings import write_settings

    write_settings(out, {"recommended": {"mode": "controlnet", "cfg": 5.0}})  # the base's, as the real bundle's
    b.run(["lcm"], work, out)
    monkeypatch.setattr(assets, "BUNDLE_DIR", out)
    lcm = Pipeline.from_pretrained("lcm")
    assert lcm.unet.config.time_cond_proj_dim == 8 and lcm.text_encoder is not None
    assert {k: lcm.recommended[k] for k in ("scheduler", "steps")} == {"scheduler": "lcm", "steps": 2}
    assert lcm.recommended["mode"] == "controlnet" and lcm.recommended["cfg"] == 7.0  # the student's CFG wins
    # distilled under the bundle's canny ControlNet, whose window it replaces with the whole run
    assert lcm.recommended["control_window"] == [0.0, 1.0]
    assert json.loads((out / "lcm" / "controlstack.json").read_text())["training"]["controls"] == ["canny"]
    canny = str(out / "controlnets" / "canny")  # by path: this toy bundle lacks the ControlNets that make it the default
    assert lcm("a cube", [Control(canny, edges)], output_type="np", progress=False).shape == (1, 64, 64, 3)
    stages = json.loads((out / "stages.json").read_text())
    assert stages["vae"]["steps"] == 1 and stages["controlnet-canny"]["condition"] == "canny"
    assert all(b.is_done(s, work) for s in b.stages(out))
    card = (out / "README.md").read_text()
    assert "| vae | 1 x 2 | 64 |" in card and "controlnet-canny" in card
    # fp16 storage
    from safetensors.torch import load_file

    weights = load_file(out / "controlnets" / "canny" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {__import__("torch").float16}

    assert assets.verify_checksums(out) == []
    assert "steps x batch" in (out / "controlnets" / "canny" / "README.md").read_text()
    (out / "fidelity.json").write_text(json.dumps({"scenes": 2, "f1": {"canny": {"control": 0.6, "no_control": 0.2}},
                                                   "fid": {"canny": 1.5}}))
    b.write_model_card(out)
    assert "F1 0.600 with control vs 0.200 without (3.00x); FID 1.500" in (
        out / "controlnets" / "canny" / "README.md").read_text()
    assert "| canny | 0.600 | 0.200 | 3.00x |  | 1.500 | F1 >= 0.5 and >= 3x | yes |" in (out / "README.md").read_text()
    assert assets.verify_checksums(out) == []  # cards are not model files

    # done stages are skipped: a second run trains nothing (the clock file would grow otherwise)
    before = (work / "vae" / "wall_seconds.json").read_text()
    b.run(None, work, out)
    assert (work / "vae" / "wall_seconds.json").read_text() == before

    # the bundle is a loadable base + ControlNet
    from controlstack import Control, Pipeline
    from controlstack.io.checkpoints import load_base, load_controlnet

    pipe = Pipeline(load_base(out), controlnets={"canny": load_controlnet(out / "controlnets" / "canny")})
    hint = np.zeros((64, 64, 3), np.uint8)
    hint[20:44, 20] = 255
    images = pipe("a red sphere", controls=[Control("canny", hint)], steps=2, output_type="np", progress=False)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_controlnet_checkpoints_of_another_base_are_not_resumed(tmp_path):
    from controlstack.training.bundle import _forget_if_base_changed

    bundle, work = tmp_path / "bundle", tmp_path / "work" / "controlnet-canny"
    (bundle / "unet").mkdir(parents=True)
    unet = bundle / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(b"base 1")
    _forget_if_base_changed(work, bundle)
    (work / "checkpoints").mkdir()
    _forget_if_base_changed(work, bundle)  # same base: the checkpoints stay
    assert (work / "checkpoints").is_dir()
    unet.write_bytes(b"base 2")  # e.g. the base stage was trained again
    _forget_if_base_changed(work, bundle)
    assert not (work / "checkpoints").exists() and (work / "base_unet.sha256").is_file()


def test_recorded_config_paths_inside_the_checkout_are_relative():
    from controlstack.training import bundle as b

    inside = str(b.REPO_ROOT / "src" / "controlstack" / "assets" / "bundle")
    config = {"base": inside, "data": "/elsewhere/world", "nested": {"vae": inside + "/vae"}, "steps": 3}
    assert b._portable(config) == {"base": "src/controlstack/assets/bundle", "data": "/elsewhere/world",
                                   "nested": {"vae": "src/controlstack/assets/bundle/vae"}, "steps": 3}
    assert (b.REPO_ROOT / "pyproject.toml").is_file()  # REPO_ROOT is the checkout


def test_list_reports_the_stages_of_another_bundle_folder(tmp_path, capsys):
    """``--bundle DIR`` builds a new bundle beside the shipped one (``make bundle-v2``)."""
    from controlstack.training import bundle as b

    (tmp_path / "next" / "vae").mkdir(parents=True)
    (tmp_path / "next" / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    assert b.main(["--bundle", str(tmp_path / "next"), "--work", str(tmp_path / "work"), "--list"]) == 0
    status = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert status["vae"] == "done" and status["base"] == "to do" and status["world"] == "to do"


def test_a_stage_clock_is_written_while_it_trains(tmp_path, monkeypatch):
    """A session's stop kills the run without unwinding it: the clock must already be on disk."""
    import time

    from controlstack import training
    from controlstack.training import bundle as b

    seen = []

    def fake_train(config, resume=False):
        time.sleep(0.4)
        seen.append(json.loads((tmp_path / "work" / "wall_seconds.json").read_text())["seconds"])
        raise KeyboardInterrupt  # the stop: what ran is still counted

    monkeypatch.setattr(b, "CLOCK_EVERY", 0.05)
    monkeypatch.setattr(training, "recipe", lambda name: (None, fake_train))
    with pytest.raises(KeyboardInterrupt):
        b._timed_training(b.Stage("vae", "vae", tmp_path / "w.safetensors"), None, tmp_path / "work")
    assert 0.2 < seen[0] < 0.4  # written by the ticker during the run
    total = json.loads((tmp_path / "work" / "wall_seconds.json").read_text())["seconds"]
    assert total >= 0.4 and not (tmp_path / "work" / "wall_seconds.tmp").exists()


def test_a_budget_sizes_the_stage_from_a_probe(tmp_path, monkeypatch):
    """``--budget vae=3``: a probe run reports 100 img/s, so 3 s at batch 2 is 150 steps; the probe's
    folder is thrown away and its rate recorded with the stage."""
    from pathlib import Path

    from controlstack import training
    from controlstack.training import bundle as b
    from controlstack.training.session import MetricsLog
    from controlstack.training.vae import VAEConfig

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "vae.yaml").write_text(yaml.safe_dump(TINY["vae"]))
    probes, trained = [], []

    def fake_train(config, resume=False):  # only the probe reaches the recipe here
        probes.append(config.max_steps)
        out = Path(config.output_dir)
        out.mkdir(parents=True)
        MetricsLog(out / "metrics.csv", None).log(config.max_steps, images_per_s=100.0)

    class Trained(Exception):
        """Raised where the real stage would start training: the test ends there."""

    def fake_timed(stage, config, work):
        trained.append(config)
        raise Trained

    (tmp_path / "work").mkdir()
    monkeypatch.setattr(b, "_RATES", {})
    monkeypatch.setattr(training, "recipe", lambda name: (VAEConfig, fake_train))
    monkeypatch.setattr(b, "_timed_training", fake_timed)
    stage = b.Stage("vae", "vae", tmp_path / "bundle" / "vae" / "w.safetensors")
    with pytest.raises(Trained):
        b.run_stage(stage, tmp_path / "work", tmp_path / "bundle", tmp_path / "configs", {"vae": 3.0})
    assert probes == [b.PROBE_STEPS] and trained[0].max_steps == 150
    assert not (tmp_path / "work" / ".probe-vae").exists()
    # a budget smaller than the probe still trains the probe's step count, not zero steps
    monkeypatch.setattr(b, "_RATES", {})
    with pytest.raises(Trained):
        b.run_stage(stage, tmp_path / "work", tmp_path / "bundle", tmp_path / "configs", {"vae": 0.01})
    assert trained[1].max_steps == b.PROBE_STEPS
    assert b.budget_for(b.Stage("controlnet-seg", "controlnet", tmp_path), {"controlnet": 30.0}) == 30.0
    assert b.budget_for(b.Stage("controlnet-seg", "controlnet", tmp_path),
                        {"controlnet": 30.0, "controlnet-seg": 60.0}) == 60.0


@pytest.mark.parametrize("args, message", [
    (["--budget", "base"], "give STAGE=SECONDS"),
    (["--budget", "base=-1"], "seconds must be positive"),
    (["--budget", "bass=10"], "unknown stage 'bass'"),
    (["--configs", "/nonexistent/configs"], "folder '/nonexistent/configs' not found"),
])
def test_bad_budget_and_configs_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    from controlstack.training import bundle as b

    assert b.main(["--bundle", str(tmp_path / "b"), "--work", str(tmp_path / "w"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
