"""Prompt fidelity on the world: is each object the colour its caption names?

The world's captions name object colours ("a red sphere"); a generated image of a held-out scene
keeps them when the colour inside each object's instance mask (``metrics.colour_feature``: the lit
half's chromaticity and level) is nearest the prototype of the caption's colour name. Prototypes
are that name's median feature over other held-out scenes' real renders -- the names as the
world's own lighting renders them. Only plain and speckled objects count (a striped or checkered
one is half an unnamed second colour). Used by ``benchmarks/fidelity.py`` (text) and
``benchmarks/ip_adapter.py`` (image prompts).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from controlstack.evaluation.metrics import colour_feature, nearest_name
from controlstack.world import HELD_OUT_SEED, WorldConfig, render, sample_scene

PROTOTYPE_SCENES = 100_000  # held-out scene indices from here on name the colours; below: the test scenes


def object_mask(row: dict, entity) -> np.ndarray:
    """The pixels of ``entity`` in a rendered row (its instance id)."""
    return np.asarray(row["instances"]) == entity.instance


def named_objects(scenes, rows, min_pixels: int = 20) -> list[tuple[int, object]]:
    """(scene index, entity) of every object whose caption colour names its whole surface -- plain
    and speckled; a striped or checkered object is half an unnamed second colour -- with at least
    ``min_pixels`` visible."""
    return [(i, e) for i, s in enumerate(scenes) for e in s.entities
            if e.kind == "object" and "color" in e.words and e.words.get("texture") in ("plain", "speckled")
            and object_mask(rows[i], e).sum() >= min_pixels]


def colour_prototypes(size: int, scenes: int = 300) -> dict[str, np.ndarray]:
    """Per colour name, the median :func:`colour_feature` of such objects in the real renders of
    ``scenes`` *other* held-out scenes: the names as the world's own lighting renders them."""
    others = [sample_scene([HELD_OUT_SEED, PROTOTYPE_SCENES + i], WorldConfig(size=size)) for i in range(scenes)]
    rows = [render(s, size) for s in tqdm(others, desc="colour prototypes", unit="scene")]
    samples: dict[str, list] = {}
    for i, e in named_objects(others, rows):
        samples.setdefault(e.words["color"], []).append(
            colour_feature(np.asarray(rows[i]["image"]), object_mask(rows[i], e)))
    return {name: np.median(v, axis=0) for name, v in samples.items()}


def colour_hits(objects, rows, images, prototypes) -> float:
    """Fraction of ``objects`` whose colour in ``images[i]`` is named as the caption names it."""
    hits = [nearest_name(colour_feature(np.asarray(images[i]), object_mask(rows[i], e)), prototypes)
            == e.words["color"] for i, e in objects]
    return float(np.mean(hits)) if hits else 0.0
