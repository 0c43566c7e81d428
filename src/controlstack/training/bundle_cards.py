"""The bundle's model cards: ``bundle/README.md`` (every stage's data, config, steps, wall time and
machine, and the measured numbers once the benchmarks have written them) and one card per trained
model folder (ControlNets, MI and Omni models, the predictor, the evaluation networks, the
IP-Adapter), written by ``make bundle`` after each stage and by the benchmarks that measure them."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from controlstack.assets import BUNDLE_DIR
from controlstack.evaluation.report import fidelity_table


def _stage_rows(stages_info: dict) -> list[str]:
    rows = ["| stage | steps x batch | resolution | wall time | machine | finished |",
            "| --- | ---: | ---: | ---: | --- | --- |"]
    for name, info in stages_info.items():
        rows.append(f"| {name} | {info['steps']} x {info['batch_size']} | {info['resolution']} | "
                    f"{info['wall_seconds'] / 60:.0f} min | {info['machine']} | {info['finished']} |")
    return rows


def _lineage(name: str, stages_info: dict) -> list[str]:
    """The stage and the bundle stages it was fine-tuned from (by ``init_from``), oldest first."""
    out = [name]
    while True:
        init = str(stages_info[out[-1]].get("config", {}).get("init_from", ""))
        parent = next((n for n, i in stages_info.items() if n not in out and init
                       and init.endswith("/" + i.get("dest", f"controlnets/{i.get('condition')}"))), None)
        if parent is None:
            return out[::-1]
        out.append(parent)


def write_model_card(bundle: Path = BUNDLE_DIR) -> Path:
    """``bundle/README.md`` from ``stages.json`` (data, config, steps, wall time, machine) and, when
    ``benchmarks/fidelity.py --json bundle/fidelity.json`` has been run, its measured numbers; and
    one card per ControlNet (``controlnets/<name>/README.md``) with its own stage and numbers."""
    stages_info = json.loads((bundle / "stages.json").read_text()) if (bundle / "stages.json").is_file() else {}
    fidelity_path = bundle / "fidelity.json"
    fidelity = json.loads(fidelity_path.read_text()) if fidelity_path.is_file() else None
    data = next((i["data"] for i in stages_info.values()), "")
    lines = ["# controlstack bundled default model", "",
             "Trained from scratch by `make bundle` on the procedural world (no external data or weights).",
             "fp16 safetensors; loaded by `controlstack.Pipeline.from_pretrained()`.", "",
             *_stage_rows(stages_info),
             "", (f"Data: {data}. Configs: `src/controlstack/configs/bundle/` (the exact values of each run are "
             "in `stages.json`). `SHA256SUMS` lists every model file's checksum.")]
    if fidelity is not None:
        lines += ["", "## Measured (`benchmarks/fidelity.py`)", "", *fidelity_table(fidelity)]
    path = bundle / "README.md"
    bundle.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")

    for name, info in stages_info.items():
        folder = bundle / info.get("dest", f"controlnets/{info.get('condition')}")
        if info.get("recipe") == "predictor" and folder.is_dir():
            (folder / "README.md").write_text("\n".join(_predictor_card(bundle, name, info)) + "\n")
        if info.get("recipe") in ("features", "clip") and folder.is_dir():
            (folder / "README.md").write_text("\n".join(_evaluation_card(bundle, name, info)) + "\n")
        if info.get("recipe") == "ip_adapter" and folder.is_dir():
            (folder / "README.md").write_text("\n".join(_ip_adapter_card(bundle, name, info)) + "\n")
        if info.get("recipe") not in ("controlnet", "omni") or not folder.is_dir():
            continue
        lineage = _lineage(name, stages_info)
        kind = {"omni": "Omni ControlNet"}.get(info["recipe"], "Minimal Impact ControlNet" if name.startswith("mi-")
                                                              else "ControlNet")
        named = f" (`{folder.name}`)" if folder.name != info["condition"] else ""
        what = (f"condition column `{info['condition']}` of the world export." if info["recipe"] != "omni" else
                f"tasks {', '.join(info['config'].get('tasks', []))} mixed per sample, each a learned token "
                "(`task_tokens.safetensors`) prefixed to the ControlNet's prompt. Fine-tuned from the bundled canny "
                "ControlNet; use `Control(model=\"omni\", task=...)`; see docs/omni.md.")
        transformer = name.startswith("sd3-")  # a ControlNet of the SD3-layout base, measured on its own
        on = "the locked bundled SD3-layout base (`sd3/`)" if transformer else "the locked bundled base"
        card = [f"# {kind}: {info['condition']}{named}", "",
                f"Trained by `make bundle` (stage `{name}`) on {on}, {what}"
                + (" Fine-tuned from the bundled plain ControlNet; see docs/mi.md." if name.startswith("mi-") else ""),
                "", *_stage_rows({n: stages_info[n] for n in lineage}), "",
                f"Data: {info['data']}.", "", "Config:", "", "```yaml",
                yaml.safe_dump(info["config"], sort_keys=False).strip(), "```"]
        if transformer and (bundle / "sd3_fidelity.json").is_file():
            f1 = json.loads((bundle / "sd3_fidelity.json").read_text())
            card += ["", (f"Measured on {f1['scenes']} held-out scenes (`benchmarks/sd3_fidelity.py`): edge F1 "
                          f"{f1['f1']['controlnet']:.3f} in controlnet mode, {f1['f1']['balanced']:.3f} balanced, vs "
                          f"{f1['f1']['no_control']:.3f} without "
                          f"({f1['f1']['controlnet'] / max(f1['f1']['no_control'], 1e-9):.2f}x).")]
        elif fidelity is not None and info["condition"] in fidelity.get("f1", {}) and not name.startswith("mi-"):
            f1 = fidelity["f1"][info["condition"]]
            card += ["", (f"Measured on {fidelity['scenes']} held-out scenes (`benchmarks/fidelity.py`): "
                         f"F1 {f1['control']:.3f} with control vs {f1['no_control']:.3f} without "
                         f"({f1['control'] / max(f1['no_control'], 1e-9):.2f}x); "
                         f"FID {fidelity.get('fid', {}).get(info['condition'], float('nan')):.3f}.")]
        card += _mi_numbers(bundle, name, info) + _omni_numbers(bundle, info)
        (folder / "README.md").write_text("\n".join(card) + "\n")
    return path


def _ip_adapter_card(bundle: Path, name: str, info: dict) -> list[str]:
    """The bundled IP-Adapter's card: its stage, config and, once measured, ``ip_adapter.json``."""
    card = ["# IP-Adapter (plus) for the bundled base", "", f"Trained by `make bundle` (stage `{name}`) on the locked "
            "bundled base: `ip-adapter.safetensors` (the IP-Adapter file layout) and `image_encoder/` (the world "
            "CLIP's vision tower, frozen). `controlstack generate --image-prompt ref.png` uses it; see "
            "docs/adapters.md.", "", *_stage_rows({name: info}), "", f"Data: {info['data']}.", "", "Config:", "",
            "```yaml", yaml.safe_dump(info["config"], sort_keys=False).strip(), "```"]
    measured = bundle / "ip_adapter.json"
    if measured.is_file():
        m = json.loads(measured.read_text())
        card += ["", f"Measured on {m['scenes']} held-out scenes (`benchmarks/ip_adapter.py`, {m['objects']} objects):",
                 "", "| row | colour | structure F1 | CLIP score |", "| --- | ---: | ---: | ---: |",
                 *[f"| {r} | {v['colour']:.1%} | {v['structure_f1']:.3f} | {v['clip_score']:.2f} |"
                   for r, v in m["rows"].items()]]
    return card


def _evaluation_card(bundle: Path, name: str, info: dict) -> list[str]:
    """An evaluation network's card (docs/evaluation.md): its stage, config and measured numbers."""
    what = {"features": ("FID / KID feature network", "a 4-stage CNN whose 64-wide embedding is the FID / KID "
                         "feature; trained to predict the scene graph's content (caption words, seg class areas, "
                         "the number of visible things, the sky's colour). Load with "
                         "`controlstack.evaluation.networks.load_feature_net`."),
            "clip": ("World CLIP", "transformers' `CLIPModel` (ViT 128 px / patch 16, width 128, 4 layers per "
                     "tower, 64-d joint space) trained contrastively on world photos and captions; a standard "
                     "CLIP folder (`CLIPModel.from_pretrained`). CLIP score = 100 * max(cos, 0).")}[name]
    card = [f"# {what[0]} (evaluation)", "", f"Trained by `make bundle` (stage `{name}`) from random initialisation "
            f"on the world export: {what[1]} See docs/evaluation.md.", "", *_stage_rows({name: info}), "",
            f"Data: {info['data']}.", "", "Config:", "", "```yaml",
            yaml.safe_dump(info["config"], sort_keys=False).strip(), "```"]
    metrics = bundle / "evaluation.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        if name == "clip":
            r = m["clip"]["retrieval"]
            card += ["", f"Measured on {m['scenes']} held-out scenes (`benchmarks/evaluation_networks.py`): caption "
                         f"retrieval top-1 {r['image_to_text']:.1%} image -> caption, {r['text_to_image']:.1%} caption "
                         f"-> image (chance {1 / m['clip']['candidates']:.1%}); CLIP score of real renders "
                         f"{m['clip']['clip_real_matched']:.1f} with their captions, {m['clip']['clip_real_shuffled']:.1f} "
                         f"with shuffled ones; the true caption beats a one-colour swap in {m['clip']['binding']:.1%}."]
        else:
            t = m["features"]["fid_table"]
            card += ["", f"Measured on {m['scenes']} held-out scenes (`benchmarks/evaluation_networks.py`), FID "
                         "against half of the real renders:", "", "| set | FID | KID |", "| --- | ---: | ---: |"]
            card += [f"| {k} | {v['fid']:.3f} | {v['kid']:.4f} |" for k, v in t.items()]
    return card


def _predictor_card(bundle: Path, name: str, info: dict) -> list[str]:
    """The multi-task dense predictor's card: its stage, config and (when measured) its numbers."""
    card = ["# Multi-task dense predictor (OmniControlNet stage 1)", "",
            "Trained by `make bundle` (stage `predictor`) from random initialisation on the world's exact ground "
            "truth: depth, soft edge (hed), normals, segmentation, human and animal keypoints. The learned "
            "annotators (`depth`, `hed`, `scribble_hed`, `normal_estimate`, `seg_estimate`, `pose_estimate`) run it "
            "by default; see docs/omni.md.", "", *_stage_rows({name: info}), "", f"Data: {info['data']}.", "",
            "Config:", "", "```yaml", yaml.safe_dump(info["config"], sort_keys=False).strip(), "```"]
    path = bundle / "omni.json"
    if path.is_file():
        report = json.loads(path.read_text())
        joint = report.get("predictor", {}).get("joint", {})
        card += ["", f"Measured on {report['scenes']} held-out scenes (`benchmarks/omni_tables.py`): "
                     + ", ".join(f"{t} {k} {v}" for t, m in joint.items() for k, v in m.items()
                                 if k not in ("threshold", "keypoints")) + "."]
    return card


def _omni_numbers(bundle: Path, info: dict) -> list[str]:
    """The Omni ControlNet card's measured numbers from ``bundle/omni.json``; [] for other models."""
    path = bundle / "omni.json"
    if info.get("recipe") != "omni" or not path.is_file():
        return []
    report = json.loads(path.read_text())
    lines = ["", f"Measured on {report['scenes']} held-out scenes (`benchmarks/omni_tables.py`, docs/omni.md):"]
    for task, r in report.get("controlnet", {}).items():
        if task == "no control":
            continue
        sp = r.get("specialised")
        lines.append(f"- {task}: F1 {r['omni']['f1']:.3f}, FID {r['omni']['fid']:.2f}"
                     + (f" (specialised ControlNet: F1 {sp['f1']:.3f}, FID {sp['fid']:.2f})" if sp else ""))
    return lines


def _mi_numbers(bundle: Path, name: str, info: dict) -> list[str]:
    """A Minimal Impact model card's measured numbers, from ``bundle/mi.json``
    (``benchmarks/mi_tables.py --json``); [] when not measured yet."""
    path = bundle / "mi.json"
    if not name.startswith("mi-") or not path.is_file():
        return []
    report = json.loads(path.read_text())
    cond = info["condition"]
    stage = "stage 1" if name.endswith("-stage1") else "stage 2" if name == f"mi-{cond}" else None
    lines = ["", "Measured by `benchmarks/mi_tables.py` on held-out scenes (docs/mi.md):"]
    asym = {r["model"]: r for r in report.get("asym", []) if r["condition"] == cond}
    if stage in asym and "plain" in asym:
        lines.append(f"- Asym {asym[stage]['asym']:.4g} (NAsym {asym[stage]['nasym']:.3g}); the plain ControlNet: "
                     f"{asym['plain']['asym']:.4g} (NAsym {asym['plain']['nasym']:.3g}).")
    label = {"stage 1": "MI stage 1", "stage 2": "MI stage 2"}.get(stage or "", "")
    for r in report.get("texture", []):
        if r["condition"] == cond and r["prompt"] == "full" and r["variant"] in (label, "plain", "real renders"):
            lines.append(f"- silent half, full caption, {r['variant']}: TV {r['tv_silent']:.4f}, denoising loss "
                         f"{r['denoising_loss']:.3f}" + (f", FID {r['fid']:.2f}" if r.get("fid") is not None else ""))
    return lines if len(lines) > 2 else []
