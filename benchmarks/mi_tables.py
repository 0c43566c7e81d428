"""Minimal Impact ControlNet's claims in miniature: writes ``docs/mi.md`` (tables and figures).

On held-out world scenes (seeds ``[HELD_OUT_SEED, i]``, never trained on) with fixed sampling
seeds, the paper's protocols (``controlstack.evaluation.mi``):

* **Ablation** (paper Tables 1 and 7): two conditions from two different scenes, centre-cropped,
  randomly resized, one in the left half and one in the right, the rest silent; the prompt joins the
  two scenes' brief captions. Per half: FID (own VAE features) and condition fidelity (edge F1
  inside the condition's box, 2 px), plus TV in the silence and the base's denoising loss, for
  plain ControlNets; + data rebalancing; + balanced injection / combination (stage 1);
  + conservativity (stage 2) -- and plain ControlNets under the inference-only ``mi`` mode.
* **Silent-region texture** (Fig. 4a, Table 5): one condition kept in the left half of its scene,
  the right half silent, with the full, brief and empty caption: TV of the right half beside FID,
  the denoising loss, and the real renders' TV in the same half.
* **Asym** (Table 6): ``controlstack asym`` of the plain, stage-1 and stage-2 ControlNets.
* **Figure 1 analogue**: a grid of two-condition samples, plain sum vs MI.

The plain ControlNets are sampled as the paper's baseline, summed on both CFG halves (``sum``),
and in the bundle's own setting for them (``controlnet`` mode, uniform layer weights: control on
the conditional half only), and under the inference-only ``mi`` mode (λ ≤ 2, the default for
them, and λ ≤ 20, the paper's cap); MI models in ``mi``, as trained (their ``controlstack.json``).
Models that are not trained yet are left out, with a note.

    .venv/bin/python benchmarks/mi_tables.py --pairs 50          # ~40 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from controlstack import Control, Pipeline, assets
from controlstack.evaluation.asym import measure_asym
from controlstack.evaluation.metrics import edges, frechet_distance
from controlstack.evaluation.mi import (
    box_f1,
    box_mask,
    brief_caption,
    composite,
    denoising_loss,
    half,
    place,
    total_variation,
    vae_features,
)
from controlstack.io.png import make_labelled_grid
from controlstack.io.settings import recommended_mode
from controlstack.training.rebalance import blank_value
from controlstack.world import HELD_OUT_SEED, WorldConfig, render, sample_scene

ROOT = Path(__file__).resolve().parents[1]
SUM = ("sum", {})  # the paper's baseline: residuals summed, on both CFG halves (diffusers' default)
PLAIN_MODE = ("controlnet", {"layer_weights": "uniform"})  # the bundle's setting for its plain ControlNets
SHORT = {"plain ControlNets + sum": "plain", "plain ControlNets, controlnet mode": "plain, controlnet mode",
         "plain ControlNets, inference-only mi": "plain, mi, lambda<=2",
         "plain ControlNets, inference-only mi, λ ≤ 20": "plain, mi, lambda<=20",
         "+ data rebalancing": "rebalancing only", "+ balanced injection & combination (stage 1)": "MI stage 1",
         "+ conservativity (stage 2)": "MI stage 2", "MI stage 2 models, summed": "MI stage 2, sum"}


def variants(bundle: Path, conditions: list[str]) -> list[tuple[str, dict, tuple[str, dict]]]:
    """(label, {condition: model path}, (mode, options)) for every ablation row whose models exist."""
    def path(kind: str, c: str) -> Path:
        return {"plain": bundle / "controlnets" / c, "rebalance": bundle / "mi" / f"{c}-rebalance",
                "stage1": bundle / "mi" / f"{c}-stage1", "stage2": bundle / "controlnets" / f"mi-{c}"}[kind]

    rows = [("plain ControlNets + sum", "plain", SUM),
            ("plain ControlNets, controlnet mode", "plain", PLAIN_MODE),
            ("plain ControlNets, inference-only mi", "plain", ("mi", {})),
            ("plain ControlNets, inference-only mi, λ ≤ 20", "plain", ("mi", {"lambda_max": 20.0})),
            ("+ data rebalancing", "rebalance", SUM),
            ("+ balanced injection & combination (stage 1)", "stage1", None),
            ("+ conservativity (stage 2)", "stage2", None),
            ("MI stage 2 models, summed", "stage2", SUM)]
    out = []
    for label, kind, mode in rows:
        models = {c: path(kind, c) for c in conditions}
        if all((m / "config.json").is_file() for m in models.values()):
            rec = recommended_mode(next(iter(models.values()))) or PLAIN_MODE
            out.append((label, {c: str(m) for c, m in models.items()}, mode or rec))
        else:
            print(f"note: '{label}' left out: {', '.join(str(m) for m in models.values() if not m.is_dir())} not trained")
    return out


def scene_rows(n: int, size: int, offset: int = 0) -> list[dict]:
    return [render(sample_scene([HELD_OUT_SEED, offset + i], WorldConfig(size=size)), size)
            for i in tqdm(range(n), desc="scenes", unit="scene")]


def to_rgb(a) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(a)).convert("RGB"))


def generate(pipe, prompt, controls, mode, seed, steps, cfg) -> np.ndarray:
    images = pipe(prompt, controls=controls, steps=steps, cfg=cfg, seed=seed, mode=mode[0],
                  mode_options=mode[1] or None, progress=False)
    return np.asarray(images[0])


def fid(pipe, a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return frechet_distance(vae_features(pipe, a), vae_features(pipe, b)) if len(a) > 1 else float("nan")


def two_condition(pipe, rows, pair, rows_variants, args, size):
    """The ablation table: per half FID and fidelity, silent TV, denoising loss; and the figure."""
    rng = np.random.default_rng(args.seed)
    n = len(rows) // 2
    jobs = []
    for k in range(n):
        a, b = rows[2 * k], rows[2 * k + 1]
        places = [place(size, 0, rng), place(size, 1, rng)]
        blanks = [blank_value(c) for c in pair]
        hints = composite([to_rgb(a[pair[0]]), to_rgb(b[pair[1]])], places, blanks, size)
        # the reference edges inside each box: the input edges (canny) or the source's real render
        refs = []
        for c, src, p in zip(pair, (a, b), places):
            edge_src = to_rgb(src[c]) if c == "canny" else to_rgb(src["image"])
            canvas = composite([edge_src], [p], [(0, 0, 0)], size)[0]
            refs.append(edges(Image.fromarray(canvas), is_edge_map=True) if c == "canny"
                        else edges(Image.fromarray(canvas)) & box_mask(size, p.box))
        silent = ~(box_mask(size, places[0].box) | box_mask(size, places[1].box))
        prompt = f"{brief_caption(a['text'])}, {brief_caption(b['text'])}"
        jobs.append((hints, places, refs, silent, prompt, (a, b)))
    real = [np.asarray(r["image"]) for r in rows]
    real_halves = [[half(im, s) for im in real] for s in (0, 1)]
    table, samples = [], {}
    for label, models, mode in rows_variants:
        gen, f1s, tvs = [], [[], []], []
        for k, (hints, places, refs, silent, prompt, _) in enumerate(tqdm(jobs, desc=label[:30], unit="pair")):
            controls = [Control(models[c], Image.fromarray(h)) for c, h in zip(pair, hints)]
            g = generate(pipe, prompt, controls, mode, k, args.steps, args.cfg)
            gen.append(g)
            for s in (0, 1):
                f1s[s].append(box_f1(g, refs[s], places[s].box))
            tvs.append(total_variation(g, silent))
        samples[label] = gen
        table.append({"variant": label, "mode": " ".join([mode[0], *(f"{k}={v}" for k, v in mode[1].items())]),
                      "fid_left": fid(pipe, [half(g, 0) for g in gen], real_halves[0]),
                      "fid_right": fid(pipe, [half(g, 1) for g in gen], real_halves[1]),
                      "f1_left": float(np.mean(f1s[0])), "f1_right": float(np.mean(f1s[1])),
                      "tv_silent": float(np.mean(tvs)),
                      "denoising_loss": denoising_loss(pipe, gen, [j[4] for j in jobs])})
    reference = {"tv_silent_real": float(np.mean([total_variation(np.asarray(j[5][0]["image"]), j[3]) for j in jobs])),
                 "denoising_loss_real": denoising_loss(pipe, real[: 2 * n: 2], [r["text"] for r in rows[: 2 * n: 2]])}
    return table, reference, jobs, samples


def single_condition(pipe, rows, condition, models, args, size):
    """Table 5: TV of the silent right half with full / brief / empty captions, beside realism."""
    right = np.zeros((size, size), bool)
    right[:, size // 2:] = True
    real = [np.asarray(r["image"]) for r in rows]
    out = []
    for style in ("empty", "brief", "full"):
        prompts = [{"empty": "", "brief": brief_caption(r["text"]), "full": r["text"]}[style] for r in rows]
        for label, model, mode in models:
            gen = []
            for i, (r, p) in enumerate(zip(tqdm(rows, desc=f"{condition} {style} {label[:20]}", unit="scene"), prompts)):
                hint = to_rgb(r[condition]).copy()
                hint[:, size // 2:] = np.round(np.asarray(blank_value(condition)) * 255).astype(np.uint8)
                gen.append(generate(pipe, p, [Control(model, Image.fromarray(hint))], mode, i, args.steps, args.cfg))
            out.append({"condition": condition, "prompt": style, "variant": label,
                        "tv_silent": float(np.mean([total_variation(g, right) for g in gen])),
                        "fid": fid(pipe, gen, real), "denoising_loss": denoising_loss(pipe, gen, prompts)})
        out.append({"condition": condition, "prompt": style, "variant": "real renders",
                    "tv_silent": float(np.mean([total_variation(g, right) for g in real])), "fid": None,
                    "denoising_loss": denoising_loss(pipe, real, prompts)})
    return out


def fmt(v, digits=3) -> str:
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) and np.isfinite(v) else str(v))


def write_doc(path: Path, report: dict, figures: dict[str, str]) -> None:
    lines = ["# Minimal Impact ControlNet: the paper's claims in miniature", "",
             ("Written by `benchmarks/mi_tables.py` "
             f"({report['pairs']} scene pairs / {report['scenes']} scenes, held-out world seeds, "
             f"{report['steps']} UniPC steps, CFG {report['cfg']:g}, fixed seeds). How the models are trained: "
             "[training.md](training.md#minimal-impact-controlnet). Protocols and measures: "
             "`controlstack.evaluation.mi`. FID uses the bundled VAE encoder's features (lower is better); "
             "F1 is edge F1 (2 px) inside the condition's box; TV is the mean neighbour difference "
             "(RGB in [0, 1]) inside the silent region; the denoising loss is the base model's own loss on "
             "the images (real renders: the reference; far below it = flattened, far above = speckle)."), ""]
    for pair, block in report["ablation"].items():
        a, b = pair.split("+")
        lines += [f"## Ablation: {a} (left) + {b} (right) (paper Tables 1, 2 and 7)", "",
                  f"| variant | mode | FID {a} half | FID {b} half | F1 {a} | F1 {b} | TV silent | denoising loss |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in block["rows"]:
            lines.append(f"| {r['variant']} | `{r['mode']}` | {fmt(r['fid_left'], 2)} | {fmt(r['fid_right'], 2)} | "
                         f"{fmt(r['f1_left'])} | {fmt(r['f1_right'])} | {fmt(r['tv_silent'], 4)} | "
                         f"{fmt(r['denoising_loss'])} |")
        ref = block["reference"]
        lines += [f"| real renders | | | | | | {fmt(ref['tv_silent_real'], 4)} | {fmt(ref['denoising_loss_real'])} |", ""]
        if pair in figures:
            lines += [f"![{pair}: conditions | variants | real]({figures[pair]})", ""]
    if report.get("texture"):
        lines += ["## Silent-region texture (paper Fig. 4a, Table 5)", "",
                  "The condition kept in the left half of its scene, the right half silent.", "",
                  "| condition | prompt | variant | TV silent half | FID | denoising loss |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['condition']} | {r['prompt']} | {r['variant']} | {fmt(r['tv_silent'], 4)} | "
                  f"{fmt(r['fid'], 2)} | {fmt(r['denoising_loss'])} |" for r in report["texture"]]
        lines.append("")
    if report.get("asym"):
        lines += ["## Asym (paper Table 6)", "",
                  (f"`controlstack asym`, batch {report['asym_batch']} x {report['asym_steps']} steps of held-out "
                  "scenes, one Rademacher probe per sample; the model's recommended mode."), "",
                  "| condition | model | Asym | NAsym |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {r['condition']} | {r['model']} | {r['asym']:.4g} | {r['nasym']:.4g} |" for r in report["asym"]]
        lines.append("")
    if report.get("findings"):
        lines += ["## Findings", "", *report["findings"], ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=50, help="scene pairs of the two-condition protocol")
    ap.add_argument("--scenes", type=int, default=50, help="scenes of the single-condition (texture) table")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the boxes' sizes and places")
    ap.add_argument("--conditions", default="canny,seg", help="the two conditions (left, right)")
    ap.add_argument("--asym-batch", type=int, default=None)
    ap.add_argument("--asym-steps", type=int, default=None)
    ap.add_argument("--wait", type=float, default=0.0,
                    help="seconds to wait for models still being trained before the ablation table")
    ap.add_argument("--out", default="outputs/mi", help="grids and mi.json")
    ap.add_argument("--doc", default=None, help="write the report here (docs/mi.md)")
    ap.add_argument("--json", default=None,
                    help="also write the numbers here (the bundle's mi.json: the MI model cards read it)")
    args = ap.parse_args()
    bundle = assets.BUNDLE_DIR
    pipe = Pipeline.from_pretrained()
    size = pipe.native_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pair = args.conditions.split(",")
    report: dict = {"pairs": args.pairs, "scenes": args.scenes, "steps": args.steps, "cfg": args.cfg,
                    "ablation": {}, "texture": [], "asym": []}
    figures = {}

    # the texture and Asym tables first, the ablation last (it also needs the rebalancing-only models)
    found = variants(bundle, pair)
    texture_scenes = scene_rows(args.scenes, size, offset=10_000)
    for c in pair:
        models = [(SHORT[label], m[c], mode) for label, m, mode in found
                  if "rebalancing" not in label and "summed" not in label]
        report["texture"] += single_condition(pipe, texture_scenes, c, models, args, size)

    kw = {k: v for k, v in (("batch", args.asym_batch), ("steps", args.asym_steps)) if v is not None}
    for c in pair:
        for label, name in (("plain", c), ("stage 1", str(bundle / "mi" / f"{c}-stage1")), ("stage 2", f"mi-{c}")):
            path = bundle / "controlnets" / name if "/" not in name else Path(name)
            if not (path / "config.json").is_file():
                continue
            res = measure_asym(pipe, str(path), condition=c, **kw)
            report["asym"].append({"condition": c, "model": label, "asym": res.asym, "nasym": res.nasym})
            print(f"asym {c} {label}: {res.line()}")
    report["asym_batch"], report["asym_steps"] = kw.get("batch", 16), kw.get("steps", 16)
    (out / "mi.json").write_text(json.dumps(report, indent=2) + "\n")  # a partial report meanwhile
    rows = scene_rows(2 * args.pairs, size)
    deadline = time.time() + args.wait  # a model still training (make bundle running beside this)
    while len(found := variants(bundle, pair)) < 8 and time.time() < deadline:
        time.sleep(30)
    table, reference, jobs, samples = two_condition(pipe, rows, pair, found, args, size)
    key = "+".join(pair)
    report["ablation"][key] = {"rows": table, "reference": reference}
    for r in table:
        print(f"{r['variant']:48s} FID {r['fid_left']:.2f}/{r['fid_right']:.2f} F1 {r['f1_left']:.3f}/"
              f"{r['f1_right']:.3f} TV {r['tv_silent']:.4f} DL {r['denoising_loss']:.3f}")
    print(f"{'real renders':48s} TV {reference['tv_silent_real']:.4f} DL {reference['denoising_loss_real']:.3f}")
    grid = []
    for k in range(min(4, len(jobs))):
        hints, _, _, _, _, (a, b) = jobs[k]
        overlay = Image.fromarray(np.maximum(hints[0], hints[1]))
        grid.append((f"pair {k}", [overlay] + [Image.fromarray(samples[label][k]) for label, *_ in found]
                     + [Image.fromarray(half_join(np.asarray(a["image"]), np.asarray(b["image"])))]))
    if grid:
        cols = ["conditions"] + [SHORT[label] for label, *_ in found] + ["real (left | right)"]
        make_labelled_grid(grid, cols).save(out / f"mi-{key}.png")
        figures[key] = f"images/mi-{key}.png"

    (out / "mi.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        if Path(args.json).resolve().parent == bundle.resolve():  # the bundle's numbers: refresh its cards
            from controlstack.training.bundle import write_model_card

            write_model_card()
    if args.doc:
        doc = Path(args.doc)
        images = doc.parent / "images"
        images.mkdir(parents=True, exist_ok=True)
        for key, rel in figures.items():
            (doc.parent / rel).write_bytes((out / Path(rel).name).read_bytes())
        previous = doc.read_text() if doc.is_file() else ""
        if "## Findings" in previous:  # the findings are written by hand; keep them
            report["findings"] = previous.split("## Findings", 1)[1].strip().splitlines()
        write_doc(doc, report, figures)
        print(f"wrote {doc}")


def half_join(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w = a.shape[1] // 2
    return np.concatenate([a[:, :w], b[:, w:]], axis=1)


if __name__ == "__main__":
    from controlstack.prompting import project_prompts

    with project_prompts():  # world captions run past the 32-token window by design: no warning
        main()
