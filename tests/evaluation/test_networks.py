"""The evaluation networks: clean-fid resizing, save / load, determinism, opt-in TorchScript, CLIP folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlstack.errors import ControlstackError
from controlstack.evaluation.networks import (
    ClipNetConfig,
    ClipScorer,
    FeatureNet,
    FeatureNetConfig,
    build_clip,
    clean_resize,
    load_feature_extractor,
    load_feature_net,
    save_clip,
    save_feature_net,
)


def test_clean_resize_is_pil_bicubic_per_float_channel():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 3, 20, 30), dtype=np.uint8)
    out = clean_resize(a, 16).numpy()
    want = np.asarray(Image.fromarray(a[0, 1].astype(np.float32), mode="F").resize((16, 16), Image.BICUBIC))
    np.testing.assert_allclose(out[0, 1], np.clip(want, 0, 255), atol=1e-4)
    assert torch.equal(clean_resize(a[:, :, :16, :16], 16), torch.from_numpy(a[:, :, :16, :16].astype(np.float32)))


def test_feature_net_round_trip_and_torchmetrics_interface(tmp_path):
    torch.manual_seed(0)
    net = FeatureNet(FeatureNetConfig(image_size=32, widths=[8, 16], num_features=6, words=["a", "b"], classes=["c"]))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    loaded = load_feature_net(save_feature_net(net, tmp_path / "f"))
    assert loaded.num_features == 6 and torch.equal(loaded(x), net.eval()(x))
    assert set(loaded.outputs(loaded.embedding(x.float() / 127.5 - 1))) == {"words", "classes", "count", "sky"}
    assert torch.equal(load_feature_extractor(tmp_path / "f")(x), loaded(x))


def test_torchscript_inception_is_opt_in(tmp_path):
    class Fake(torch.nn.Module):  # NVIDIA's interface: float [0, 255] at 299 px, return_features -> 2048
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.mean((2, 3)).repeat(1, 683)[:, :2048]

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(Fake()).save(str(path))
    with pytest.raises(ControlstackError, match="as TorchScript, which runs code"):
        load_feature_extractor(path)
    net = load_feature_extractor(path, allow_torchscript=True)
    f = net(torch.full((1, 3, 64, 64), 255, dtype=torch.uint8))
    assert net.num_features == 2048 and f.shape == (1, 2048) and float(f[0, 0]) == pytest.approx(255.0, abs=1e-3)
    assert load_feature_extractor(tmp_path, allow_torchscript=True).num_features == 2048  # an Inception folder
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ControlstackError, match="not a TorchScript Inception"):
        load_feature_extractor(tmp_path / "junk.pt", allow_torchscript=True)


def test_clip_folder_round_trip_and_scores(tmp_path):
    from controlstack.training.tokenizer import build_tokenizer

    tok = build_tokenizer("world", 16)
    torch.manual_seed(0)
    model = build_clip(ClipNetConfig(image_size=32, patch_size=16, width=32, layers=1, heads=2, projection_dim=8,
                                     max_length=16), tok)
    save_clip(model, tok, tmp_path / "clip")
    scorer = ClipScorer.load(tmp_path / "clip")
    images = [np.full((32, 48, 3), 30, np.uint8), np.full((32, 32, 3), 220, np.uint8)]
    texts = ["a red sphere on grass", "a dog"]
    cos = (scorer.image_embeds(images) * scorer.text_embeds(texts)).sum(-1).numpy()
    np.testing.assert_allclose(scorer.scores(images, texts), 100 * np.clip(cos, 0, None), rtol=1e-5)
    assert scorer.pixel_values(images).shape == (2, 3, 32, 32)  # shortest edge to 32, centre crop
    with pytest.raises(ControlstackError, match="is not a CLIP folder"):
        ClipScorer.load(tmp_path)


def test_bundled_networks_load_and_give_pinned_outputs():
    """The shipped feature network and world CLIP, on held-out scene 0 (never trained on)."""
    from controlstack import assets
    from controlstack.world import HELD_OUT_SEED, WorldConfig, render, sample_scene

    if not (assets.BUNDLE_DIR / "evaluation" / "clip" / "config.json").is_file():
        pytest.skip("this checkout has no bundled evaluation networks")
    scene = render(sample_scene([HELD_OUT_SEED, 0], WorldConfig(size=128)), 128)
    image = np.asarray(scene["image"])
    net = load_feature_extractor()
    f = net(torch.from_numpy(image).permute(2, 0, 1)[None])
    assert f.shape == (1, 64) and torch.equal(f, net(torch.from_numpy(image).permute(2, 0, 1)[None]))
    np.testing.assert_allclose(f[0, :4].numpy(), [0.6585, 1.9581, 1.5384, -0.8050], atol=1e-3)
    scorer = ClipScorer.load()
    own = scorer.scores([image], [scene["text"]])[0]
    assert own == pytest.approx(81.02, abs=0.05)  # its own caption
    assert scorer.scores([image], ["an empty scene on snow"])[0] < 10  # another scene's
