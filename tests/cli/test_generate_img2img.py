"""``controlstack generate --init / --strength / --inpaint-mask / --hires`` end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from controlstack.cli.main import main
from controlstack.io.png import read_parameters

FAST = ["--steps", "2", "--width", "64", "--height", "64", "--no-progress", "--seed", "2"]


@pytest.fixture()
def files(tmp_path):
    a = np.zeros((64, 64, 3), np.uint8)
    a[16:48, 16:48] = (200, 50, 50)
    Image.fromarray(a).save(tmp_path / "init.png")
    m = np.zeros((64, 64), np.uint8)
    m[:, 32:] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    return tmp_path


def test_inpaint_keeps_the_unmasked_half_close_and_records_the_strength(files, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "a red box", "--init", str(files / "init.png"), "--strength", "1.0",
                 "--inpaint-mask", str(files / "mask.png"), "--out", str(out), *FAST]) == 0
    image = np.asarray(Image.open(out / "00000-2.png").convert("RGB"), np.float32)
    init = np.asarray(Image.open(files / "init.png"), np.float32)
    kept, repainted = np.abs(image - init)[:, :28].mean(), np.abs(image - init)[:, 36:].mean()
    assert kept < repainted  # the known half stays nearer the init image (through the VAE)
    text = read_parameters(out / "00000-2.png")["parameters"]
    assert "Denoising strength: 1.0" in text


def test_hires_doubles_the_size(files, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "a red box", "--hires", "2", "--out", str(out), *FAST[:-2],
                 "--seed", "3", "--width", "32", "--height", "32"]) == 0
    assert Image.open(out / "00000-3.png").size == (64, 64)
    assert "Hires upscale: 2.0" in read_parameters(out / "00000-3.png")["parameters"]


def test_only_masked_inpainting_pastes_back_into_the_init_image(files, tmp_path):
    out = tmp_path / "out"
    init = np.zeros((96, 80, 3), np.uint8)
    init[:, :, 1] = np.arange(80, dtype=np.uint8)[None] * 3
    Image.fromarray(init).save(files / "init96.png")
    m = np.zeros((96, 80), np.uint8)
    m[40:56, 30:46] = 255
    Image.fromarray(m).save(files / "mask96.png")
    assert main(["generate", "--prompt", "a red box", "--init", str(files / "init96.png"), "--inpaint-mask",
                 str(files / "mask96.png"), "--inpaint-full-res", "--inpaint-padding", "8", "--mask-blur", "2",
                 "--inpainting-fill", "latent_nothing", "--out", str(out), *FAST]) == 0
    image = np.asarray(Image.open(out / "00000-2.png").convert("RGB"))
    assert image.shape == init.shape  # the init image's size, not --width / --height
    far = np.ones((96, 80), bool)
    far[34:62, 24:52] = False  # the mask plus the blur's reach (2 * int(5.5) + 1 = 11: 5 px) and a margin
    assert np.array_equal(image[far], init[far]) and np.abs(image[44:52, 34:42].astype(int) - init[44:52, 34:42]).max() > 20
    text = read_parameters(out / "00000-2.png")["parameters"]
    assert "Mask blur: 2, Inpaint area: Only masked, Masked area padding: 8, Masked content: latent nothing" in text


def test_hires_with_a_latent_upscaler_and_its_own_steps(files, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "a red box", "--hires", "2", "--hires-upscaler", "latent_bicubic",
                 "--hires-steps", "4", "--out", str(out), "--steps", "2", "--seed", "3", "--width", "32", "--height",
                 "32", "--no-progress"]) == 0
    text = read_parameters(out / "00000-3.png")["parameters"]
    assert Image.open(out / "00000-3.png").size == (64, 64)
    assert "Hires steps: 4, Hires upscaler: Latent (bicubic)" in text


@pytest.mark.parametrize("extra, message", [
    (["--inpaint-mask", "{mask}"], "--inpaint-mask needs --init"),
    (["--init", "{init}", "--inpaint-mask", "{mask}", "--mask-blur", "-1"], "inpaint mask_blur must be an integer"),
    (["--init", "{init}", "--strength", "1.5"], "--strength must be in [0, 1], got 1.5"),
])
def test_img2img_flag_errors(files, tmp_path, capsys, extra, message):
    args = ["generate", "--prompt", "x", "--out", str(tmp_path / "o"), *FAST,
            *[e.format(init=files / "init.png", mask=files / "mask.png") for e in extra]]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_single_file_base_takes_its_config_folder_and_bad_seeds_are_one_line(tmp_path, capsys):
    from controlstack.io.checkpoints import save_base
    from controlstack.models.tiny import tiny_sd
    from controlstack.training.base import export_pipeline

    sd = tiny_sd(seed=0, max_length=16)
    export_pipeline(tmp_path / "folder", sd.vae, sd.text_encoder, sd.tokenizer, sd.unet)
    save_base(sd, tmp_path / "base.safetensors")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tmp_path / "base.safetensors"), "--config", str(tmp_path / "folder"),
                 "--prompt", "x", "--out", str(out), *FAST]) == 0
    assert (out / "00000-2.png").is_file()
    assert main(["generate", "--prompt", "x", "--seed", "99999999999999999999", "--out", str(out), *FAST[:-2]]) == 2
    assert "--seed must be below 9223372036854775808" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("controlstack ")


def test_bundled_controlnets_bring_their_mode_and_the_png_records_it(files, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "a red box", "--control", f"canny:{files / 'init.png'}", "--out", str(out),
                 "--width", "64", "--height", "64", "--no-progress", "--seed", "2", "--steps", "2"]) == 0
    meta = read_parameters(out / "00000-2.png")["controlstack"]
    assert (meta["mode"], meta["mode_options"], meta["cfg"]) == ("controlnet", {"layer_weights": "uniform"}, 7.0)
    assert main(["generate", "--prompt", "a red box", "--control", f"canny:{files / 'init.png'}", "--out", str(out),
                 "--mode", "balanced", "--cfg", "5", *FAST]) == 0
    meta = read_parameters(out / "00001-2.png")["controlstack"]
    assert (meta["mode"], meta.get("mode_options"), meta["cfg"]) == ("balanced", None, 5.0)


def test_module_runs_one_controls_annotator_with_its_parameters(files, tmp_path, capsys):
    out = tmp_path / "out"
    photo = files / "init.png"
    assert main(["generate", "--prompt", "x", "--control", f"canny:{photo}", "--control", f"depth:{photo}",
                 "--module", "0:canny,low_threshold=50,high_threshold=90", "--out", str(out), *FAST]) == 0
    meta = read_parameters(out / "00000-2.png")["controlstack"]["controls"]
    assert meta[0]["preprocess"] == "canny" and not meta[1]["preprocess"]
    assert main(["generate", "--prompt", "x", "--control", f"canny:{photo}", "--module", "0:canny,low=5",
                 "--out", str(out), *FAST]) == 2
    assert "canny has no parameter 'low'" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--control", f"canny:{photo}", "--module", "1:canny",
                 "--out", str(out), *FAST]) == 2
    assert "--module 1 refers to control 1, but only 1 given" in capsys.readouterr().err
