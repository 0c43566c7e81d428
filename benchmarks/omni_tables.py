"""OmniControlNet's evidence (docs/omni.md): one predictor vs specialists, one ControlNet vs specialists.

Stage 1 -- the multi-task dense predictor (``bundle/predictor``) against single-task predictors of
the same backbone trained with the same steps per task (``--train-specialists`` trains them from
``configs/bundle/predictor.yaml`` with one task each, into ``outputs/omni/specialists/<task>``;
resumable). On ``--scenes`` held-out world scenes (seeds ``[HELD_OUT_SEED, i]``, never trained on):

* depth: AbsRel and δ < 1.25 after a least-squares scale-and-shift alignment per image, on the
  pixels the ground truth says are not sky (the map is near = bright, so sky is 0);
* hed: ODS F-score -- one threshold for the whole set, the best of 0.05 ... 0.95 -- with 2-px
  tolerance matching (a predicted edge pixel is right when a true one lies within 2 px, and the
  other way round for recall; no thinning, no bipartite matching: a simpler cousin of BSDS's);
  the ground truth is the world's soft edge > 0.5;
* normal: mean angular error (degrees) over all pixels;  seg: mIoU over the classes present;
* pose / animal_pose: PCK@0.1 -- a true keypoint counts when the matched instance's predicted
  point lies within 0.1 x the longer side of the instance's keypoint box; a missed instance counts
  all its keypoints as wrong. Instances are matched greedily by mean keypoint distance.

Stage 2 -- the Omni ControlNet (``controlnets/omni``) against the bundled specialised ControlNets,
per task, the same scenes, prompts and seeds, both in the bundle's recommended mode: condition
fidelity as ``benchmarks/fidelity.py`` measures it (canny: edge F1 against the input edge map;
every other task: structure F1 between canny of the generated image and canny of the real render)
and FID on the bundled VAE encoder's features; the parameter ratio K specialised : 1 Omni + K tokens.

    .venv/bin/python benchmarks/omni_tables.py --train-specialists
    .venv/bin/python benchmarks/omni_tables.py --scenes 100 --json src/controlstack/assets/bundle/omni.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from docblock import write_block

SPECIALISTS = Path("outputs/omni/specialists")


def train_specialists(tasks, work: Path = SPECIALISTS, data: str = "outputs/bundle/world") -> None:
    """One single-task predictor per task, with the bundled predictor's config and steps."""
    from controlstack.training.bundle import CONFIGS
    from controlstack.training.predictor import PredictorTrainConfig, train

    for task in tasks:
        out = work / task
        if (out / "model" / "model.safetensors").is_file():
            print(f"{task}: done")
            continue
        config = PredictorTrainConfig.from_yaml(CONFIGS / "predictor.yaml", data=data, output_dir=str(out),
                                                tasks=[task])
        resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
        print(f"== specialist {task} ==", flush=True)
        train(config, resume=resume)


def held_out_rows(n: int, size: int = 128) -> list[dict]:
    from controlstack.world import HELD_OUT_SEED, WorldConfig, render, sample_scene

    return [render(sample_scene([HELD_OUT_SEED, i], WorldConfig(size=size)), size) for i in range(n)]


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def evaluate_predictor(model, rows, tasks) -> dict:
    """Every metric of the module docstring for the tasks ``model`` has, on the held-out ``rows``."""
    from controlstack.evaluation import omni as M
    from controlstack.models.predictor import N_CLASSES, keypoints_at, predict
    from controlstack.training.predictor import instances, seg_to_classes

    tasks = [t for t in tasks if t in model.config.tasks]
    acc = {"depth": [], "hed": 0, "normal": [], "seg": np.zeros((N_CLASSES, N_CLASSES), np.int64),
           "pose": [0, 0], "animal_pose": [0, 0]}
    for r in rows:
        out = predict(model, np.asarray(r["image"]), tasks)
        h, w = np.asarray(r["image"]).shape[:2]
        for t in tasks:
            if t == "depth":
                acc["depth"].append(M.depth_errors(out["depth"][0], np.asarray(r["depth"], np.float64) / 255))
            elif t == "hed":
                acc["hed"] = acc["hed"] + M.edge_counts(out["hed"][0], np.asarray(r["softedge"]) > 127)
            elif t == "normal":
                gt = np.asarray(r["normal"], np.float64).transpose(2, 0, 1) / 127.5 - 1
                acc["normal"].append(M.angular_error(out["normal"], gt))
            elif t == "seg":
                acc["seg"] += M.confusion(out["seg"].argmax(0), seg_to_classes(np.asarray(r["seg"])), N_CLASSES)
            else:
                c, n = M.pck_counts(keypoints_at(t, out[t], w, h), instances(r["keypoints"], t))
                acc[t][0] += c
                acc[t][1] += n
    res: dict = {}
    if "depth" in tasks:
        e = np.nanmean(np.asarray(acc["depth"]), 0)
        res["depth"] = {"absrel": round(float(e[0]), 4), "delta1": round(float(e[1]), 4)}
    if "hed" in tasks:
        f, th = M.ods_f(acc["hed"])
        res["hed"] = {"ods_f": round(f, 4), "threshold": th}
    if "normal" in tasks:
        res["normal"] = {"mean_angle_deg": round(float(np.mean(acc["normal"])), 2)}
    if "seg" in tasks:
        res["seg"] = {"miou": round(M.mean_iou(acc["seg"]), 4)}
    for t in ("pose", "animal_pose"):
        if t in tasks:
            res[t] = {"pck": round(acc[t][0] / max(acc[t][1], 1), 4), "keypoints": acc[t][1]}
    return res


METRICS = [("depth", "absrel", "AbsRel ↓"), ("depth", "delta1", "δ<1.25 ↑"), ("hed", "ods_f", "ODS F ↑"),
           ("normal", "mean_angle_deg", "mean angle ° ↓"), ("seg", "miou", "mIoU ↑"), ("pose", "pck", "PCK@0.1 ↑"),
           ("animal_pose", "pck", "PCK@0.1 ↑")]


def predictor_table(joint: dict, special: dict, params: dict) -> list[str]:
    lines = ["| task | metric | joint (one model) | single-task | joint / single-task |",
             "| --- | --- | ---: | ---: | ---: |"]
    for task, key, label in METRICS:
        if task not in joint:
            continue
        j, s = joint[task][key], special.get(task, {}).get(key)
        cells = ("", "") if s is None else (f"{s:.3f}", f"{j / max(s, 1e-9):.2f}")
        lines.append(f"| {task} | {label} | {j:.3f} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Parameters: joint {params['joint'] / 1e6:.2f} M; the {params['n_special']} single-task "
                  f"predictors together {params['special'] / 1e6:.2f} M "
                  f"({params['special'] / max(params['joint'], 1):.1f}x)."]
    return lines


def evaluate_controlnets(rows, args) -> tuple[dict, dict]:
    """Condition fidelity and FID per task: Omni vs the bundled specialised ControlNet vs no control."""
    from PIL import Image
    from tqdm.auto import tqdm

    from controlstack import Control, Pipeline
    from controlstack.evaluation.metrics import edge_f1, edges, frechet_distance
    from controlstack.evaluation.mi import vae_features
    from controlstack.training.omni import task_column

    pipe = Pipeline.from_pretrained()
    omni = pipe.controlnet("omni")
    size = pipe.native_size
    kw = dict(steps=args.steps, cfg=args.cfg, width=size, height=size, progress=False, output_type="np",
              mode="controlnet", mode_options={"layer_weights": "uniform"})
    u8 = lambda a: (a * 255).round().astype(np.uint8)
    real = [np.asarray(r["image"]) for r in rows]
    real_edges = [edges(Image.fromarray(a)) for a in real]
    real_f = vae_features(pipe, real)
    res: dict = {"no control": {}}
    images: dict = {}
    base = [u8(pipe(r["text"], seed=i, **kw)[0]) for i, r in enumerate(tqdm(rows, desc="no control"))]
    res["no control"]["fid"] = round(frechet_distance(vae_features(pipe, base), real_f), 3)
    for task in omni.task_tokens:
        col = task_column(task)
        models = {"omni": lambda c, t=task: Control("omni", c, task=t)}
        if task in pipe.controlnets:
            models["specialised"] = lambda c, t=task: Control(t, c)
        res[task] = {}
        for name, make in models.items():
            gen, f1 = [], []
            for i, r in enumerate(tqdm(rows, desc=f"{task} {name}")):
                cond = Image.fromarray(np.asarray(r[col])).convert("RGB")
                g = u8(pipe(r["text"], [make(cond)], seed=i, **kw)[0])
                gen.append(g)
                ref = edges(cond, is_edge_map=True) if task == "canny" else real_edges[i]
                f1.append(edge_f1(ref, edges(Image.fromarray(g))))
            images[(task, name)] = gen
            res[task][name] = {"f1": round(float(np.mean(f1)), 4),
                               "fid": round(frechet_distance(vae_features(pipe, gen), real_f), 3)}
        ref_f1 = [edge_f1(edges(Image.fromarray(np.asarray(r[col])).convert("RGB"), is_edge_map=True)
                          if task == "canny" else real_edges[i], edges(Image.fromarray(base[i])))
                  for i, r in enumerate(rows)]
        res[task]["no control"] = {"f1": round(float(np.mean(ref_f1)), 4)}
    sizes = {"omni": n_params(omni), "tokens": len(omni.task_tokens) * next(iter(omni.task_tokens.values())).numel(),
             "specialised": {t: n_params(pipe.controlnet(t)) for t in omni.task_tokens if t in pipe.controlnets}}
    images["base"] = base
    return res, {"sizes": sizes, "images": images, "pipe": pipe}


def controlnet_table(res: dict, sizes: dict) -> list[str]:
    lines = ["| task | F1 Omni | F1 specialised | F1 no control | FID Omni | FID specialised |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for task, r in res.items():
        if task == "no control":
            continue
        sp = r.get("specialised")
        sp_f1, sp_fid = ("–", "–") if sp is None else (f"{sp['f1']:.3f}", f"{sp['fid']:.2f}")
        lines.append(f"| {task} | {r['omni']['f1']:.3f} | {sp_f1} | {r['no control']['f1']:.3f} | "
                     f"{r['omni']['fid']:.2f} | {sp_fid} |")
    k = len(sizes["specialised"])
    lines += ["", f"FID of the base without control: {res['no control']['fid']:.2f}. Parameters: one Omni ControlNet "
                  f"{sizes['omni'] / 1e6:.2f} M + {len(res) - 1} task tokens ({sizes['tokens']} numbers) vs the "
                  f"{k} specialised ControlNets it is compared with, {sum(sizes['specialised'].values()) / 1e6:.2f} M "
                  f"together ({sum(sizes['specialised'].values()) / sizes['omni']:.1f}x); all {len(res) - 1} task types "
                  f"as specialists would be {(len(res) - 1) * sizes['omni'] / 1e6:.1f} M."]
    return lines


def predictor_figure(out: Path) -> None:
    """docs/images/omni-predictor.png: every learned annotator on scikit-image's photographs."""
    from PIL import Image
    from skimage import data as skdata

    from controlstack import annotators
    from controlstack.io.png import make_labelled_grid

    photos = {"astronaut": skdata.astronaut(), "chelsea": skdata.chelsea(), "coffee": skdata.coffee(),
              "rocket": skdata.rocket()}
    names = ["depth", "hed", "scribble_hed", "normal_estimate", "seg_estimate", "pose_estimate"]
    grid = []
    for label, a in photos.items():
        photo = Image.fromarray(a).convert("RGB")
        photo = photo.resize((256, round(256 * photo.height / photo.width)))
        grid.append((label, [photo] + [annotators.get(n, resolution=photo.height)(photo) for n in names]))
    make_labelled_grid(grid, ["photo", *names]).save(out / "omni-predictor.png")


def controlnet_figure(rows, extra, out: Path) -> None:
    """docs/images/omni-controlnet.png: Omni vs specialised on two held-out scenes per task."""
    from PIL import Image

    from controlstack.io.png import make_labelled_grid

    images = extra["images"]
    tasks = [t for t in extra["pipe"].controlnet("omni").task_tokens]
    from controlstack.training.omni import task_column

    grid = []
    for task in tasks:
        for i in range(2):
            cond = Image.fromarray(np.asarray(rows[i][task_column(task)])).convert("RGB")
            sp = images.get((task, "specialised"))
            grid.append((f"{task} {i}", [cond, Image.fromarray(images[(task, "omni")][i]),
                                         Image.fromarray(sp[i]) if sp else Image.new("RGB", cond.size),
                                         Image.fromarray(np.asarray(rows[i]["image"]))]))
    make_labelled_grid(grid, ["condition", "Omni", "specialised", "real"]).save(out / "omni-controlnet.png")


def run_tables(args) -> None:
    """Measure what is asked (the predictor table, the ControlNet table or both), merge it into
    ``--json``'s earlier numbers, and write the doc block from everything measured."""
    from controlstack import assets
    from controlstack.models.predictor import load_predictor

    rows = held_out_rows(args.scenes)
    report = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    if report.get("scenes") not in (None, args.scenes):
        raise SystemExit(f"omni_tables: {args.json} holds numbers for {report['scenes']} scenes; use --scenes "
                         f"{report['scenes']} or another --json")
    report["scenes"] = args.scenes
    if not args.skip_predictor:
        joint_model = load_predictor(assets.predictor_folder())
        joint = evaluate_predictor(joint_model, rows, args.tasks)
        special, params = {}, {"joint": n_params(joint_model), "special": 0, "n_special": 0}
        for task in args.tasks:
            folder = SPECIALISTS / task / "model"
            if (folder / "model.safetensors").is_file():
                model = load_predictor(folder)
                special.update(evaluate_predictor(model, rows, [task]))
                params["special"] += n_params(model)
                params["n_special"] += 1
        report["predictor"] = {"joint": joint, "single_task": special, "params": params}
        predictor_figure(Path("docs/images"))
    if not args.skip_controlnet:
        res, extra = evaluate_controlnets(rows, args)
        report["controlnet"], report["sizes"] = res, extra["sizes"]
        report["controlnet_settings"] = {"steps": args.steps, "cfg": args.cfg}
        controlnet_figure(rows, extra, Path("docs/images"))
    lines = [f"Held-out scenes: {args.scenes} (seeds [HELD_OUT_SEED, i]); `benchmarks/omni_tables.py`."]
    if "predictor" in report:
        p = report["predictor"]
        lines += ["", "### Stage 1: one multi-task predictor vs single-task predictors", "",
                  *predictor_table(p["joint"], p["single_task"], p["params"])]
    if "controlnet" in report:
        st = report.get("controlnet_settings", {"steps": args.steps, "cfg": args.cfg})
        lines += ["", f"### Stage 2: one Omni ControlNet vs the specialised ControlNets ({st['steps']} steps, CFG "
                      f"{st['cfg']:g}, mode controlnet / uniform layer weights)", "",
                  *controlnet_table(report["controlnet"], report["sizes"])]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.doc:
        write_block(Path(args.doc), "<!-- omni-tables:start -->", "<!-- omni-tables:end -->", lines)


def main() -> None:
    from controlstack.models.predictor import TASKS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-specialists", action="store_true", help="train the single-task predictors first")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), help="predictor tasks (specialists, table)")
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--out", default="outputs/omni")
    ap.add_argument("--json", default=None, help="also write the numbers here (the bundle's omni.json)")
    ap.add_argument("--doc", default="docs/omni.md", help="put the tables into this file's generated block")
    ap.add_argument("--skip-controlnet", action="store_true", help="only the predictor table")
    ap.add_argument("--skip-predictor", action="store_true", help="only the ControlNet table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.train_specialists:
        train_specialists(args.tasks)
        return
    run_tables(args)


if __name__ == "__main__":
    from controlstack.prompting import project_prompts

    with project_prompts():  # world captions run past the 32-token window by design: no warning
        main()
