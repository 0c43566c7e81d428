"""The IP-Adapter recipe: 2 steps on the tiny world, only the adapter trains, its file is what
diffusers' loader reads back weight for weight, and the project's Pipeline samples with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from controlstack.errors import ControlstackError
from controlstack.training import recipe
from controlstack.training.ip_adapter import (
    ADAPTER_FILE,
    ENCODER_DIR,
    IPAdapterConfig,
    projection_to_file,
    reference_views,
)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A CLIPModel folder (random weights, 32 px / patch 8) with its preprocessor config."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    path = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    return path


def _config(world_dir, base, clip, out, **kw) -> IPAdapterConfig:
    values = dict(data=world_dir, base=base, image_encoder=str(clip), output_dir=str(out), resolution=32, batch_size=2,
                  max_steps=2, checkpoint_every=2, validate_every=2, log_every=1, num_validation_images=1,
                  num_inference_steps=2, num_tokens=4, resampler_width=64, learning_rate=1e-2, seed=1)
    return IPAdapterConfig(**(values | kw))


@pytest.mark.parametrize("projection", ["plus", "plain"])
def test_two_steps_train_the_adapter_only_and_diffusers_reads_the_file(world_dir, tiny_base_dir, tiny_clip_dir,
                                                                      tmp_path, projection):
    from diffusers import UNet2DConditionModel

    from controlstack.ip_adapter import ImagePrompt, read_ip_adapter
    from controlstack.pipeline import Pipeline
    from controlstack.training.ip_adapter import initial_state, load_image_encoder

    _, train = recipe("ip_adapter")
    cfg = _config(world_dir, tiny_base_dir, tiny_clip_dir, tmp_path / projection, projection=projection)
    out = train(cfg)
    state = load_file(str(out / ADAPTER_FILE))
    assert (out / ENCODER_DIR / "preprocessor_config.json").is_file()
    assert any((tmp_path / projection / "samples").glob("step-*.png"))

    # the file trained: it differs from the seeded initial adapter, in the projection and in W'_k
    unet = UNet2DConditionModel.from_pretrained(f"{tiny_base_dir}/unet")
    torch.manual_seed(cfg.seed)
    init = initial_state(unet, load_image_encoder(tiny_clip_dir), cfg)
    assert sorted(state) == sorted([f"image_proj.{k}" for k in init["image_proj"]] +
                                   [f"ip_adapter.{k}" for k in init["ip_adapter"]])
    assert not torch.equal(state["ip_adapter.1.to_k_ip.weight"], init["ip_adapter"]["1.to_k_ip.weight"])
    # ... and diffusers' converter puts every weight back where training had it
    unet._load_ip_adapter_weights([read_ip_adapter(out / ADAPTER_FILE)])
    layer = unet.encoder_hid_proj.image_projection_layers[0]
    assert type(layer).__name__ == ("IPAdapterPlusImageProjection" if projection == "plus" else "ImageProjection")
    back = {f"image_proj.{k}": v for k, v in projection_to_file(layer.state_dict()).items()}
    for k, v in back.items():
        assert torch.equal(v, state[k]), k

    # the project's Pipeline samples with the trained adapter and its encoder folder; the prompt changes the image
    pipe = Pipeline.from_pretrained(tiny_base_dir)
    pipe.load_ip_adapter(out / ADAPTER_FILE, image_encoder=out / ENCODER_DIR)
    ref = np.zeros((32, 32, 3), np.uint8)
    ref[:, :16] = (200, 30, 30)
    kw = dict(steps=2, seed=0, width=32, height=32, output_type="np", progress=False)
    with_ref = pipe("a red cube", [], image_prompts=[ImagePrompt(ref, 1.0)], **kw)[0]
    without = pipe("a red cube", [], **kw)[0]
    assert np.abs(with_ref - without).max() > 1e-4


def test_projection_file_layout_is_diffusers_inverse():
    """projection_to_file undoes diffusers' conversion exactly, for the plus resampler and the plain one."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    torch.manual_seed(0)
    plus = IPAdapterPlusImageProjection(embed_dims=48, output_dims=32, hidden_dims=128, depth=4, dim_head=64,
                                        heads=2, num_queries=5)
    plain = ImageProjection(cross_attention_dim=32, image_embed_dim=16, num_image_text_embeds=4)
    for module in (plus, plain):
        f = projection_to_file(module.state_dict())
        assert "proj.weight" in f if module is plain else "layers.3.0.to_kv.weight" in f
        unet_like = torch.nn.Module()
        from diffusers.loaders.unet import UNet2DConditionLoadersMixin

        rebuilt = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
            unet_like, f, low_cpu_mem_usage=False)
        assert type(rebuilt) is type(module)
        for (k, v), (k2, v2) in zip(sorted(module.state_dict().items()), sorted(rebuilt.state_dict().items())):
            assert k == k2 and torch.equal(v, v2), k


def test_reference_views_crop_flip_and_identity():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    same = reference_views(x, (1.0, 1.0), 0.0, 16, torch.Generator().manual_seed(0))
    assert torch.allclose(same, (x + 1) / 2, atol=1e-6)
    flipped = reference_views(x, (1.0, 1.0), 1.0, 16, torch.Generator().manual_seed(0))
    assert torch.allclose(flipped, ((x + 1) / 2).flip(-1), atol=1e-6)
    a = reference_views(x, (0.25, 0.25), 0.5, 32, torch.Generator().manual_seed(1))
    b = reference_views(x, (0.25, 0.25), 0.5, 32, torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("bad, message", [
    ({"projection": "resampler"}, "choose one of plus, plain"),
    ({"resampler_width": 96}, "multiple of 64"),
    ({"reference_crop": (0.9, 0.5)}, "reference_crop"),
    ({"image_dropout": 1.5}, "image_dropout"),
    ({"image_encoder": ""}, "image_encoder"),
])
def test_config_errors_are_one_line(world_dir, bad, message):
    values = dict(data=world_dir, base="b", image_encoder="c") | bad
    with pytest.raises(ControlstackError, match=message):
        IPAdapterConfig(**values)
