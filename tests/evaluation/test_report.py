"""The fidelity report's Markdown table: numbers, ratios and the target verdicts."""

from __future__ import annotations

from controlstack.evaluation.report import fidelity_table


def test_fidelity_table_rows_and_verdicts():
    report = {"scenes": 200, "steps": 20, "cfg": 7.0,
              "mode": "controlnet", "layer_weights": "uniform", "balanced_scenes": 50,
              "f1": {"canny": {"control": 0.62, "no_control": 0.31, "balanced": 0.5},
                     "depth": {"control": 0.5, "no_control": 0.2}},
              "prompt_fidelity": {"cfg 1": 0.4, "cfg 7": 0.75},
              "prompt_fidelity_objects": 120, "prompt_fidelity_real": 0.9,
              "prompt_fidelity_vae": 0.3, "fid": {"no control": 2.0, "canny": 1.25},
              "vae_roundtrip_f1": 0.66, "chance_f1": 0.3}
    text = "\n".join(fidelity_table(report))
    # canny: F1 0.62 passes its floor but 2x < 3x, so the target is not met
    assert "| canny | 0.620 | 0.310 | 2.00x | 0.500 | 1.250 | F1 >= 0.5 and >= 3x | **no** |" in text
    assert "| depth | 0.500 | 0.200 | 2.50x |  |  | >= 2x | yes |" in text
    assert "| (none: base model) | | | | | 2.000 | | |" in text
    assert "control mode `controlnet, layer_weights=uniform`" in text and "first 50 scenes" in text
    assert "caption) of 120 objects: CFG 1: 40.0%, CFG 7: 75.0% (target >= 70%: yes); the real renders score 90.0% (the metric's ceiling), their VAE round trips 30.0% (the ceiling through the VAE)" in text
    assert "= 0.660." in text and "another scene's = 0.300" in text
