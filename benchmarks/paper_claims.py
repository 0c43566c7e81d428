"""The ControlNet paper's claims in miniature (docs/paper-claims.md): numbers, plots and grids.

``train`` trains the ablation runs -- a canny ControlNet on the locked bundled base with the
bundle's ControlNet config (lr 3e-4, 50% empty prompts), shortened to ``--steps`` at batch 8 and
validated every 50 steps on 8 held-out scenes (the dense fidelity curve):

=============  ======================================================================
zero           the reference: zero convolutions, the 20k-scene world export, seed 0
zero-seed1     the same, seed 1 (sudden convergence needs >= 2 seeds)
standard       zero convolutions replaced by standard-initialised ones (``zero_init: false``)
lite           ControlNet-lite: one convolution per block (``architecture: lite``)
data-1k/10k    the reference on the first 1k / 10k scenes (``max_rows``)
data-50k       the reference on a 50k-scene export (rows 0-19999 are the 20k export's)
=============  ======================================================================

``measure`` runs every claim on held-out scenes through ``controlstack evaluate`` (FID / KID on
the project's feature network, CLIP score on its world CLIP, condition fidelity re-extracted) and
writes the block of docs/paper-claims.md between its markers, plus docs/images/claims-*.png::

    .venv/bin/python benchmarks/paper_claims.py train --runs zero lite --steps 1200
    .venv/bin/python benchmarks/paper_claims.py measure --scenes 48
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from docblock import write_block

from controlstack import assets

WORK = Path("outputs/claims")
WORLD, LATENTS = "outputs/bundle/world", "outputs/bundle/latents.safetensors"
WORLD50K, LATENTS50K = str(WORK / "world50k"), str(WORK / "latents50k.safetensors")
HELD_OUT = str(WORK / "heldout16")  # `controlstack world export --seed 1000000 --scenes 16`: held-out scenes
RUNS = {
    "zero": {},
    "zero-seed1": {"seed": 1},
    "standard": {"zero_init": False},
    "lite": {"architecture": "lite"},
    "data-1k": {"max_rows": 1000},
    "data-10k": {"max_rows": 10000},
    "data-50k": {"data": WORLD50K, "latent_cache": LATENTS50K},
}
DATA_ROWS = {"data-1k": 1000, "data-10k": 10000, "zero": 20000, "data-50k": 50000}
DOC, IMAGES = Path("docs/paper-claims.md"), Path("docs/images")
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


def train(runs: list[str], steps: int) -> None:
    from controlstack.training.controlnet import ControlNetConfig, train as train_controlnet

    for name in runs:
        out = WORK / "runs" / name
        if (out / "model").is_dir():
            print(f"{name}: done")
            continue
        config = ControlNetConfig.from_yaml(
            Path(assets.__file__).parent.parent / "configs" / "bundle" / "controlnet.yaml",
            **{"data": WORLD, "latent_cache": LATENTS, "base": str(assets.BUNDLE_DIR), "condition": "canny",
               "output_dir": str(out), "max_steps": steps, "batch_size": 8, "validate_every": 50,
               "num_validation_images": 8, "num_inference_steps": 10, "checkpoint_every": 100,
               "validation_data": HELD_OUT, "mixed_precision": "no", **RUNS[name]})
        train_controlnet(config, resume=(out / "checkpoints").is_dir())


def curve(name: str) -> tuple[list[int], list[float]]:
    path = WORK / "runs" / name / "metrics.csv"
    if not path.is_file():
        return [], []
    with path.open() as f:
        rows = [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["metric"] == "fidelity"]
    return [s for s, _ in rows], [v for _, v in rows]


def jump_step(steps: list[int], values: list[float]) -> int | None:
    """The first validation step at which fidelity has covered half the way from its start to its
    final plateau (mean of the last 3 points): where the sudden convergence happens."""
    if len(values) < 4:
        return None
    start, end = values[0], float(np.mean(values[-3:]))
    if end - start < 0.05:  # no rise: no convergence to locate
        return None
    return next(s for s, v in zip(steps, values) if v >= start + 0.5 * (end - start))


def evaluate(out: Path, scenes: int, **grid) -> dict:
    from controlstack.evaluation.evaluate import EvaluateConfig, run

    torch.set_num_threads(1)
    return run(EvaluateConfig(scenes=scenes, **grid), out)


def step_zero(scenes: int = 4) -> dict:
    """A fresh ControlNet (copy and lite, zero convolutions) leaves the bundled base exactly as it is;
    standard-initialised convolutions do not. Max |difference| of the sampled images in [0, 1]."""
    from controlstack import Control, Pipeline
    from controlstack.evaluation.evaluate import held_out_scenes
    from controlstack.training.controlnet import build_controlnet

    pipe = Pipeline.from_pretrained()
    rows = held_out_scenes(scenes, pipe.native_size)
    out = {}
    for label, arch, zero in (("copy, zero convolutions", "copy", True), ("lite, zero convolutions", "lite", True),
                              ("copy, standard convolutions", "copy", False)):
        torch.manual_seed(0)
        cn = build_controlnet(pipe.unet, pipe.vae, (8, 16, 32, 64), architecture=arch, zero_init=zero).eval()
        diffs = []
        for i, r in enumerate(rows):
            kw = dict(steps=10, cfg=7.0, seed=i, progress=False, output_type="np", mode="balanced")
            a = pipe(r["text"], **kw)
            b = pipe(r["text"], [Control(cn, Image.fromarray(r["canny"]).convert("RGB"))], **kw)
            diffs.append(float(np.abs(a - b).max()))
        out[label] = max(diffs)
    return out


def composition(pairs: int, steps: int = 20, cfg: float = 7.0) -> tuple[dict, list]:
    """Two ControlNets summed vs each alone (paper Sec. 4.4 / Fig. 6): canny of scene A in a box of the
    left half, depth of scene B in a box of the right half (MIControlNet's protocol, mi.composite),
    each condition's edge F1 in its own box, with the bundle's recommended mode."""
    from controlstack import Control, Pipeline
    from controlstack.evaluation.evaluate import held_out_scenes
    from controlstack.evaluation.metrics import edges
    from controlstack.evaluation.mi import box_f1, box_mask, brief_caption, composite, place
    from controlstack.training.rebalance import blank_value

    pipe = Pipeline.from_pretrained()
    size = pipe.native_size
    rows = held_out_scenes(2 * pairs, size, start=1000)
    rng = np.random.default_rng(0)
    res = {k: [[], []] for k in ("both", "alone")}
    grid = []
    for k in range(pairs):
        a, b = rows[2 * k], rows[2 * k + 1]
        places = [place(size, 0, rng), place(size, 1, rng)]
        hints = composite([a["canny"], b["depth"]], places, [blank_value("canny"), blank_value("depth")], size)
        refs = [edges(Image.fromarray(composite([a["canny"]], [places[0]], [(0, 0, 0)], size)[0]), is_edge_map=True),
                edges(Image.fromarray(composite([b["image"]], [places[1]], [(0, 0, 0)], size)[0]))
                & box_mask(size, places[1].box)]
        prompt = f"{brief_caption(a['text'])}, {brief_caption(b['text'])}"
        controls = [Control("canny", Image.fromarray(hints[0])), Control("depth", Image.fromarray(hints[1]))]
        kw = dict(steps=steps, cfg=cfg, seed=k, progress=False)
        both = np.asarray(pipe(prompt, controls, **kw)[0])
        alone = [np.asarray(pipe(prompt, [c], **kw)[0]) for c in controls]
        for s in (0, 1):
            res["both"][s].append(box_f1(both, refs[s], places[s].box))
            res["alone"][s].append(box_f1(alone[s], refs[s], places[s].box))
        if k < 4:
            grid.append((f"pair {k}", [Image.fromarray(h) for h in hints] + [Image.fromarray(x) for x in (*alone, both)]))
    table = {k: {"canny_box_f1": float(np.mean(v[0])), "depth_box_f1": float(np.mean(v[1]))} for k, v in res.items()}
    return table, grid


def rows_of(report: dict, **match) -> list[dict]:
    return [r for r in report["rows"] if all(r[k] == v for k, v in match.items())]


def measure(scenes: int) -> dict:
    """Every claim's numbers (and figures in docs/images); returns the claims.json dict."""
    from controlstack.io.png import make_labelled_grid

    out: dict = {"scenes": scenes}
    out["step_zero"] = step_zero()
    trained = {n: str(WORK / "runs" / n / "model") for n in RUNS if (WORK / "runs" / n / "model").is_dir()}
    out["curves"] = {n: dict(zip(("steps", "fidelity"), curve(n))) for n in RUNS}
    out["jump"] = {n: jump_step(*curve(n)) for n in RUNS}
    ev = WORK / "evaluate"
    # architecture ablation and data scale: every trained run, no prompt and the full caption, CFG 7
    if trained:
        rep = evaluate(ev / "runs", scenes, controls=("canny", "none"), models=tuple(trained.values()),
                       modes=("balanced",), cfg=(7.0,), prompt_styles=("empty", "full"))
        out["runs"] = {n: {r["prompt_style"]: {"f1": r["fidelity"]["edge_f1"], "fid": r["fid"], "kid": r["kid"],
                                               "clip": r["clip_score"]} for r in rows_of(rep, model=p)}
                       for n, p in trained.items()}
        out["runs"]["no control"] = {r["prompt_style"]: {"f1": r["fidelity"]["canny.edge_f1"], "fid": r["fid"],
                                                         "kid": r["kid"], "clip": r["clip_score"]}
                                     for r in rows_of(rep, control=None)}
        out["reference"] = rep["reference"]
    # CFG resolution weighting: no prompt, CFG 7, control on both halves vs the conditional half
    rep = evaluate(ev / "cfg", scenes, controls=("canny", "depth"), models=("plain",),
                   modes=("balanced", "controlnet", "controlnet:layer_weights=uniform"), cfg=(7.0,),
                   prompt_styles=("empty",))
    out["cfg_weighting"] = rep["rows"]
    # Table 3 analogue: the base, the bundled ControlNets, MI and Omni, full captions, each as recommended
    table = []
    for model, controls in (("plain", ("canny", "depth", "seg", "pose", "none")),
                            ("mi", tuple(c for c in ("canny", "depth", "seg", "pose") if
                                         (assets.BUNDLE_DIR / "controlnets" / f"mi-{c}").is_dir())),
                            ("omni", ("canny", "depth", "seg", "pose"))):
        if controls:
            table += evaluate(ev / f"table3-{model}", scenes, controls=controls, models=(model,), modes=("auto",),
                              cfg=(7.0,), prompt_styles=("full",))["rows"]
    out["table3"] = table
    out["composition"], grid = composition(max(4, scenes // 4))
    make_labelled_grid(grid, ["canny (left)", "depth (right)", "canny alone", "depth alone", "both summed"]).save(
        IMAGES / "claims-composition.png")
    return out


def figures(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from controlstack.evaluation.evaluate import held_out_scenes, row_key
    from controlstack.io.png import make_labelled_grid

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, c in out["curves"].items():
        if c.get("steps"):
            ax.plot(c["steps"], c["fidelity"], marker=".", label=name, lw=2 if name.startswith("zero") else 1)
    ax.set(xlabel="training step (batch 8)", ylabel="validation edge F1 (8 held-out scenes, 2 px)",
           title="condition fidelity during training: the sudden convergence")
    ax.legend(fontsize=8)
    fig.savefig(IMAGES / "claims-convergence.png", dpi=90, bbox_inches="tight")
    plt.close(fig)

    if "runs" in out:
        pts = [(DATA_ROWS[n], out["runs"][n]) for n in DATA_ROWS if n in out["runs"]]
        if len(pts) >= 2:
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
            for style, mark in (("empty", "o"), ("full", "s")):
                axes[0].plot([p[0] for p in pts], [p[1][style]["f1"] for p in pts], marker=mark, label=f"{style} prompt")
                axes[1].plot([p[0] for p in pts], [p[1][style]["fid"] for p in pts], marker=mark, label=f"{style} prompt")
            for a, lab in zip(axes, ("edge F1 ↑", "FID ↓")):
                a.set(xscale="log", xlabel="training scenes", ylabel=lab)
                a.legend(fontsize=8)
            fig.savefig(IMAGES / "claims-data-scale.png", dpi=90, bbox_inches="tight")
            plt.close(fig)
        # the ablation grid: condition | real | zero | standard | lite, no prompt
        names = [n for n in ("zero", "standard", "lite") if n in out["runs"]]
        scenes = held_out_scenes(4, 128)
        tiles = []
        for i, s in enumerate(scenes):
            row = [Image.fromarray(s["canny"]).convert("RGB"), Image.fromarray(s["image"])]
            for n in names:
                key = row_key({"model": str(WORK / "runs" / n / "model"), "control": "canny", "mode": "balanced",
                               "cfg": 7.0, "prompt_style": "empty"})
                row.append(Image.open(WORK / "evaluate" / "runs" / "images" / key / f"{i:04d}.png"))
            tiles.append((f"scene {i}", row))
        make_labelled_grid(tiles, ["canny", "real", *names]).save(IMAGES / "claims-ablation.png")


def _f(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def block(out: dict) -> list[str]:
    n = out["scenes"]
    lines = [f"Measured by `benchmarks/paper_claims.py` on {n} held-out world scenes (UniPC 20 steps, CFG 7, "
             "sampling seed = scene index); FID / KID on the project's feature network, CLIP score on its world "
             "CLIP, canny fidelity as edge F1 (2 px) of canny(generated) against the input edges.", ""]
    lines += ["### Zero convolutions: the first step changes nothing", "",
              "| fresh ControlNet on the bundled base | max abs difference of the image (0-1) |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.3g} |" for k, v in out["step_zero"].items()]
    if "runs" in out:
        ref = out.get("reference", {})
        lines += ["", "### Architecture ablation, data scale (same steps, batch, lr)", "",
                  "| run | F1 no prompt | F1 full caption | FID no prompt | FID full | CLIP full | jump at step |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in out["runs"].items():
            e, f = r.get("empty", {}), r.get("full", {})
            lines.append(f"| {name} | {_f(e.get('f1'))} | {_f(f.get('f1'))} | {_f(e.get('fid'))} | {_f(f.get('fid'))} | "
                         f"{_f(f.get('clip'))} | {out['jump'].get(name) or '–'} |")
        lines += ["", f"Reference: FID between two halves of the real renders {_f(ref.get('fid_real_split'))}; "
                      f"CLIP score of real renders with their captions {_f(ref.get('clip_real_matched'))}, "
                      f"with shuffled captions {_f(ref.get('clip_real_shuffled'))}."]
    lines += ["", "### CFG resolution weighting (no prompt, CFG 7)", "",
              "| control | mode | fidelity | FID | CLIP |", "| --- | --- | --- | ---: | ---: |"]
    for r in out["cfg_weighting"]:
        fid = ", ".join(f"{k} {_f(v)}" for k, v in r["fidelity"].items() if k != "tv")
        lines.append(f"| {r['control']} | {r['mode']} | {fid} | {_f(r['fid'])} | {_f(r['clip_score'])} |")
    c = out["composition"]
    lines += ["", "### Composition: two ControlNets summed vs each alone", "",
              "| | canny F1 in its box | depth (structure F1) in its box |", "| --- | ---: | ---: |",
              f"| each alone | {_f(c['alone']['canny_box_f1'])} | {_f(c['alone']['depth_box_f1'])} |",
              f"| both summed | {_f(c['both']['canny_box_f1'])} | {_f(c['both']['depth_box_f1'])} |"]
    lines += ["", "### Table 3 analogue: every model on one table (full captions, each model's recommended mode)", "",
              "| model | control | FID | KID | CLIP | fidelity |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in out["table3"]:
        fid = ", ".join(f"{k} {_f(v)}" for k, v in r["fidelity"].items() if k != "tv")
        lines.append(f"| {r['model']} | {r['control'] or 'none'} | {_f(r['fid'])} | {_f(r['kid'])} | "
                     f"{_f(r['clip_score'])} | {fid} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    t.add_argument("--steps", type=int, default=1200)
    m = sub.add_parser("measure")
    m.add_argument("--scenes", type=int, default=48)
    m.add_argument("--write-only", action="store_true", help="rewrite the doc from outputs/claims/claims.json")
    args = ap.parse_args()
    if args.cmd == "train":
        train(args.runs, args.steps)
        return
    path = WORK / "claims.json"
    if args.write_only:
        out = json.loads(path.read_text())
    else:
        out = measure(args.scenes)
        path.write_text(json.dumps(out, indent=1, default=float))
    figures(out)
    write_block(DOC, BEGIN, END, block(out))
    print(f"{DOC} updated")


if __name__ == "__main__":
    from controlstack.prompting import project_prompts

    with project_prompts():  # world captions run past the 32-token window by design: no warning
        main()
