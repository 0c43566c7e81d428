"""Do Omni's task tokens matter where the hint alone cannot say which condition it is? (docs/omni.md)

OmniControlNet (Wang et al., 2024) tells conditions apart with a task token in the ControlNet's
prompt. On the bundled Omni ControlNet, swapping a depth or seg hint's token for ``<canny>`` changed
nothing: those hints look like no other condition. This ablation asks the question where it should
matter -- look-alike pairs: ``hed`` vs ``scribble`` (both white lines on black) and ``depth`` vs
``normal`` (both smooth shading of the same surfaces) -- and a control, ``canny``.

On ``--scenes`` held-out world scenes (seeds ``[HELD_OUT_SEED, i]``), each condition's hint is
sampled with its own token, its look-alike's token and ``<canny>``, at the same seeds, in the bundle's
recommended mode (20 UniPC steps, CFG 7). Per (condition, token):

* structure F1 (``benchmarks/fidelity.py``'s protocol: canny of the image against canny of the real
  render; canny: against the input edges) and FID on the bundled VAE encoder's features;
* the **token effect**: mean absolute pixel change (0-255) against the image with the right token,
  beside the **seed effect** -- the change the next sampling seed makes with the right token. A token
  effect far below the seed effect means the token does not steer the model.

    .venv/bin/python benchmarks/omni_tokens.py --scenes 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from docblock import write_block
from omni_tables import held_out_rows

#: condition -> the tokens it is sampled with: its own first, then its look-alike's and <canny>
TRIALS = {"hed": ("hed", "scribble", "canny"), "scribble": ("scribble", "hed", "canny"),
          "depth": ("depth", "normal", "canny"), "normal": ("normal", "depth", "canny"), "canny": ("canny", "hed")}


def main() -> None:
    from PIL import Image
    from tqdm.auto import tqdm

    from controlstack import Control, Pipeline
    from controlstack.evaluation.metrics import edge_f1, edges, frechet_distance
    from controlstack.evaluation.mi import vae_features
    from controlstack.training.omni_tasks import task_column

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=40)
    ap.add_argument("--json", default="outputs/omni/tokens.json")
    ap.add_argument("--doc", default="docs/omni.md")
    args = ap.parse_args()
    torch.set_num_threads(2)

    pipe = Pipeline.from_pretrained()
    size = pipe.native_size
    rows = held_out_rows(args.scenes, size)
    kw = dict(width=size, height=size, progress=False, output_type="np")
    u8 = lambda a: (a * 255).round().astype(np.uint8)
    real = [np.asarray(r["image"]) for r in rows]
    real_f, real_edges = vae_features(pipe, real), [edges(Image.fromarray(a)) for a in real]
    report: dict = {"scenes": args.scenes, "rows": []}
    for cond_task, tokens in TRIALS.items():
        hints = [Image.fromarray(np.asarray(r[task_column(cond_task)])).convert("RGB") for r in rows]
        make = lambda i, token, seed: u8(pipe(rows[i]["text"], [Control("omni", hints[i], task=token)],
                                              seed=seed, **kw)[0])
        ref = [edges(h, is_edge_map=True) for h in hints] if cond_task == "canny" else real_edges
        own = None
        for token in tokens:
            images = [make(i, token, i) for i in tqdm(range(len(rows)), desc=f"{cond_task} hint, <{token}>")]
            row = {"condition": cond_task, "token": token,
                   "f1": float(np.mean([edge_f1(ref[i], edges(Image.fromarray(g))) for i, g in enumerate(images)])),
                   "fid": float(frechet_distance(vae_features(pipe, images), real_f))}
            if own is None:
                own = images
                reseeded = [make(i, token, i + 10_000) for i in range(len(rows))]
                row["seed_effect"] = float(np.mean([np.abs(a.astype(float) - b).mean() for a, b in zip(own, reseeded)]))
            row["token_effect"] = float(np.mean([np.abs(a.astype(float) - b).mean() for a, b in zip(own, images)]))
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{args.scenes} held-out scenes, 20 UniPC steps, CFG 7, the same seeds per row; "
             "`benchmarks/omni_tokens.py`.", "",
             "| condition (hint) | token | structure F1 | FID | token effect (0-255) | seed effect (0-255) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    seed = {r["condition"]: r["seed_effect"] for r in report["rows"] if "seed_effect" in r}
    for r in report["rows"]:
        lines.append(f"| {r['condition']} | `<{r['token']}>` | {r['f1']:.3f} | {r['fid']:.2f} | "
                     f"{r['token_effect']:.2f} | {seed[r['condition']]:.2f} |")
    print("\n".join(lines))
    write_block(Path(args.doc), "<!-- omni-tokens:start -->", "<!-- omni-tokens:end -->", lines)


if __name__ == "__main__":
    from controlstack.prompting import project_prompts

    with project_prompts():  # world captions run past the 32-token window by design: no warning
        main()
