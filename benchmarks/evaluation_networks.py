"""What the bundled evaluation networks measure (docs/evaluation.md, their model cards).

On ``--scenes`` held-out world scenes (never trained on):

* world CLIP: top-1 caption retrieval (image -> caption and caption -> image among all scenes);
  the CLIP score with the scene's own caption, with another scene's, and with its own caption
  with one colour word swapped -- and how often the true caption beats that swap (binding);
* feature network: its held-out label accuracy (content words, count of visible things), and
  FID / KID against the real renders of sets that differ in known ways -- the other half of the
  real renders (same distribution), their VAE round trips, a blur, every hue rotated by 120°
  (the same layout in other colours) -- side by side with the FID on the bundled VAE encoder's
  features that the project used before. A content feature must rank the hue rotation far from the real renders; the VAE's does not.

Writes ``bundle/evaluation.json`` (read by the model cards) and the numbers block of
docs/evaluation.md::

    .venv/bin/python benchmarks/evaluation_networks.py --scenes 200
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from docblock import write_block

from controlstack import assets
from controlstack.evaluation.evaluate import held_out_scenes
from controlstack.evaluation.networks import ClipScorer, load_feature_extractor
from controlstack.evaluation.quality import clip_score, fid_kid, shuffled

DOC = Path("docs/evaluation.md")
BEGIN, END = "<!-- networks:begin -->", "<!-- networks:end -->"


def swap_colour(caption: str, rng: np.random.Generator) -> str | None:
    """The caption with its first colour word replaced by another colour (None: no colour word)."""
    from controlstack.world.palette import COLOR_NAMES

    words = caption.split(" ")
    idx = [i for i, w in enumerate(words) if w in COLOR_NAMES]
    if not idx:
        return None
    i = idx[0]
    words[i] = str(rng.choice([c for c in COLOR_NAMES if c != words[i]]))
    return " ".join(words)


def hue_rotate(image: np.ndarray) -> np.ndarray:
    return image[..., [1, 2, 0]]  # R->G->B->R: every colour moves 120° around the hue circle


def clip_numbers(scorer: ClipScorer, images, captions) -> dict:
    rng = np.random.default_rng(0)
    swapped = [swap_colour(c, rng) for c in captions]
    keep = [i for i, s in enumerate(swapped) if s is not None]
    own = scorer.scores([images[i] for i in keep], [captions[i] for i in keep])
    other = scorer.scores([images[i] for i in keep], [swapped[i] for i in keep])
    return {"retrieval": scorer.retrieval(images, captions), "candidates": len(images),
            "clip_real_matched": clip_score(scorer, images, captions),
            "clip_real_shuffled": clip_score(scorer, images, shuffled(captions)),
            "clip_colour_swapped": float(other.mean()), "binding": float((own > other).mean()),
            "binding_pairs": len(keep)}


def feature_numbers(images, captions, scenes) -> dict:
    from controlstack import Pipeline
    from controlstack.evaluation.metrics import frechet_distance
    from controlstack.evaluation.mi import to_vae_input, vae_features
    from controlstack.training.evaluators import content_words, scene_labels

    net = load_feature_extractor()
    pipe = Pipeline.from_pretrained()
    half = len(images) // 2
    real_a, real_b = images[:half], images[half:2 * half]
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(to_vae_input(real_b)).latent_dist.mode()).sample
    roundtrip = list(((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    variants = {"real (other half)": real_b, "VAE round trip": roundtrip,
                "blur (radius 1.5)": [np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.5))) for x in real_b],
                "hue rotated 120°": [hue_rotate(x) for x in real_b]}
    vae_a = vae_features(pipe, real_a)
    table = {}
    for name, imgs in variants.items():
        table[name] = {**fid_kid(net, real_a, imgs), "fid_vae_features": frechet_distance(vae_features(pipe, imgs), vae_a)}
    # held-out label accuracy of the feature network's own heads
    from controlstack.world.palette import GROUNDS

    cfg = net.config
    words = content_words()
    grounds = [words.index(g) for g in GROUNDS]
    preds, truths, ground_right, count_right = [], [], [], []
    with torch.no_grad():
        for img, cap, s in zip(images, captions, scenes):
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
            out = net.outputs(net.embedding(x))
            labels = scene_labels(cap, np.asarray(s["seg"]), np.asarray(s["instances"]), img, cfg)
            p = torch.sigmoid(out["words"][0]).numpy()
            preds.append(p > 0.5)
            truths.append(labels["words"] > 0.5)
            ground_right.append(labels["words"][grounds[int(np.argmax(p[grounds]))]] > 0.5)
            count_right.append(int(out["count"][0].argmax()) == int(labels["count"]))
    pred, truth = np.array(preds), np.array(truths)
    tp = float((pred & truth).sum())
    f1 = 2 * tp / max(float(pred.sum() + truth.sum()), 1.0)
    return {"fid_table": table, "labels": {"word_f1": f1, "ground_accuracy": float(np.mean(ground_right)),
                                           "count_accuracy": float(np.mean(count_right)), "words": len(words)},
            "parameters": sum(p.numel() for p in net.parameters())}


def block(res: dict) -> list[str]:
    c, f = res["clip"], res["features"]
    r = c["retrieval"]
    lines = [f"Measured by `benchmarks/evaluation_networks.py` on {res['scenes']} held-out scenes.", "",
             f"**World CLIP** ({c['parameters'] / 1e6:.2f} M parameters): caption retrieval top-1 among "
             f"{c['candidates']} scenes **{r['image_to_text']:.1%}** (image -> caption) and "
             f"**{r['text_to_image']:.1%}** (caption -> image); chance {1 / c['candidates']:.1%}. CLIP score of the "
             f"real renders with their own caption {c['clip_real_matched']:.1f}, with another scene's "
             f"{c['clip_real_shuffled']:.1f}, with one colour word swapped {c['clip_colour_swapped']:.1f}; the true "
             f"caption beats its colour swap in {c['binding']:.1%} of {c['binding_pairs']} scenes.", "",
             f"**Feature network** ({f['parameters'] / 1e6:.2f} M parameters): on held-out scenes its caption-word "
             f"head reaches a micro F1 of {f['labels']['word_f1']:.2f} over the {f['labels']['words']} content words, "
             f"names the ground right in {f['labels']['ground_accuracy']:.1%} of the images (5 grounds) and the "
             f"number of visible things in {f['labels']['count_accuracy']:.1%}. FID / KID of sets that differ "
             f"from the real renders in known ways, against the other half of them, beside FID on the VAE "
             f"encoder's features used before:", "",
             "| set | FID (feature network) | KID | FID (VAE encoder features) |", "| --- | ---: | ---: | ---: |"]
    for name, v in f["fid_table"].items():
        lines.append(f"| {name} | {v['fid']:.3f} | {v['kid']:.4f} | {v['fid_vae_features']:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    scenes = held_out_scenes(args.scenes, 128)
    images = [np.asarray(s["image"]) for s in scenes]
    captions = [s["text"] for s in scenes]
    scorer = ClipScorer.load()
    res = {"scenes": args.scenes,
           "clip": {**clip_numbers(scorer, images, captions),
                    "parameters": sum(p.numel() for p in scorer.model.parameters())},
           "features": feature_numbers(images, captions, scenes)}
    out = assets.BUNDLE_DIR / "evaluation.json"  # beside mi.json / omni.json: numbers, not model files (no checksum)
    out.write_text(json.dumps(res, indent=1))
    write_block(DOC, BEGIN, END, block(res))
    from controlstack.training.bundle import write_model_card

    write_model_card()  # the networks' cards carry these numbers
    print("\n".join(block(res)))
    print(re.sub(r"\s+", " ", f"wrote {out} and {DOC}"))


if __name__ == "__main__":
    main()
