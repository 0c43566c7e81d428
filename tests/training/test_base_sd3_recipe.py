"""The SD3-layout base recipe (``training/base_sd3.py``): 2 steps of rectified flow on the tiny world;
the exported folder is a ``StableDiffusion3Pipeline`` folder the project loads as an SD3 base, whose
text conditioning is the recipe's own (``join_text``), and the ControlNet recipe trains on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack.errors import ControlstackError
from controlstack.training import recipe


def _config(world_dir, vae, out, **kw):
    from controlstack.training.base_sd3 import SD3BaseConfig

    values = {"data": world_dir, "vae": vae, "output_dir": str(out), "resolution": 32, "batch_size": 2, "max_steps": 2,
              "checkpoint_every": 2, "validate_every": 2, "log_every": 1, "num_validation_images": 1,
              "num_inference_steps": 2, "layers": 1, "heads": 2, "head_dim": 8, "text_hidden_size": 32,
              "text_layers": 1, "text_heads": 2, "learning_rate": 1e-3, "vocabulary": "bytes", "max_length": 16}
    return SD3BaseConfig(**(values | kw))


def test_two_steps_export_an_sd3_folder_the_project_samples(world_dir, tiny_vae_dir, tmp_path):
    from controlstack import Pipeline
    from controlstack.training.base_sd3 import SD3TextToImage

    _, train = recipe("base_sd3")
    out = train(_config(world_dir, tiny_vae_dir, tmp_path / "b"))
    assert (out / "transformer" / "config.json").is_file() and not (out / "text_encoder_3").exists()
    assert any((tmp_path / "b" / "samples").glob("step-*.png"))
    pipe = Pipeline.from_pretrained(out)
    assert pipe.family.name == "sd3" and pipe.text_encoder_3 is None
    # sampling conditions on the text exactly as training did
    net = SD3TextToImage(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    ids = pipe.tokenizer(["a red cube"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    x, t = torch.randn(1, pipe.unet.config.in_channels, 4, 4), torch.tensor([0.5])
    hidden, pooled = pipe.family.encode_text(pipe, "a red cube", 1)
    with torch.no_grad():
        expected = pipe.unet(hidden_states=x, timestep=t * 1000, encoder_hidden_states=hidden,
                             pooled_projections=pooled, return_dict=False)[0]
        torch.testing.assert_close(net(x, t, ids), expected)
    image = pipe("a red cube", steps=2, width=32, height=32, output_type="np", progress=False)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_bad_config_is_one_line(world_dir, tiny_vae_dir, tmp_path):
    with pytest.raises(ControlstackError, match="text_hidden_size"):
        _config(world_dir, tiny_vae_dir, tmp_path, text_hidden_size=33)
    with pytest.raises(ControlstackError, match="shift"):
        _config(world_dir, tiny_vae_dir, tmp_path, shift=0.0)
