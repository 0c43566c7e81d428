"""``mode="mi"`` caps λ for ControlNets that were not trained with the mi injection (their residuals
are small next to the U-Net's features, where the balanced λ saturates: speckle), and keeps the
paper's 20 for MI-trained ones (their ``controlstack.json`` says so)."""

from __future__ import annotations

import numpy as np

from controlstack import Control
from controlstack.io.settings import write_settings
from controlstack.pipeline import INFERENCE_ONLY_LAMBDA_MAX


def test_mi_lambda_cap_follows_how_each_controlnet_was_trained(pipe, tiny_controlnets, hint_images, tmp_path):
    import copy

    import torch

    # a weak control (residuals ~ a twentieth of the tiny ControlNet's): where λ saturates
    weak = copy.deepcopy(tiny_controlnets[0])
    with torch.no_grad():
        for layer in [*weak.controlnet_down_blocks, weak.controlnet_mid_block]:
            layer.weight.mul_(0.05)
            layer.bias.mul_(0.05)
    plain, mi = tmp_path / "plain", tmp_path / "mi"
    weak.save_pretrained(plain)
    weak.save_pretrained(mi)
    write_settings(mi, {"recommended": {"mode": "mi"}, "training": {"injection": "mi"}})
    c_plain, c_mi = Control(str(plain), hint_images[0]), Control(str(mi), hint_images[0])

    assert pipe.mi_options("mi", None, [c_mi]) is None  # the paper's λ_max = 20
    assert pipe.mi_options("mi", None, [c_plain]) == {"lambda_max": INFERENCE_ONLY_LAMBDA_MAX}
    assert pipe.mi_options("mi", {"reduce": "position"}, [c_mi, c_plain]) == {
        "reduce": "position", "lambda_max": INFERENCE_ONLY_LAMBDA_MAX}
    assert pipe.mi_options("mi", {"lambda_max": 20.0}, [c_plain]) == {"lambda_max": 20.0}  # explicit wins
    assert pipe.mi_options("sum", None, [c_plain]) is None
    assert pipe.mi_options("mi", None, [Control(tiny_controlnets[0], hint_images[0])]) == {
        "lambda_max": INFERENCE_ONLY_LAMBDA_MAX}  # a model object counts as plain

    kw = {"steps": 2, "width": 64, "height": 64, "output_type": "np", "progress": False, "mode": "mi"}
    result = pipe("a box", controls=[c_plain], return_result=True, **kw)
    assert result.parameters["mode_options"] == {"lambda_max": INFERENCE_ONLY_LAMBDA_MAX}  # recorded in the PNG
    capped = result.images
    explicit = pipe("a box", controls=[c_plain], mode_options={"lambda_max": INFERENCE_ONLY_LAMBDA_MAX}, **kw)
    uncapped = pipe("a box", controls=[c_plain], mode_options={"lambda_max": 20.0}, **kw)
    assert np.array_equal(capped, explicit) and not np.array_equal(capped, uncapped)
