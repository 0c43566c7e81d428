"""Captions from the scene graph, in a small fixed vocabulary.

A caption names the visible entities, largest first (at most :data:`MAX_MENTIONS`), pairs them
with a spatial relation read off the render (screen position and depth), and ends with the
ground: ``"a red striped sphere left of a blue cube, a brown dog on grass"``. Only words from
:data:`VOCABULARY` appear (plus ``","``), so a tokenizer can be built from that list alone
(``caption_words`` splits a caption the same way).
"""

from __future__ import annotations

import re

import numpy as np

from controlstack.world import palette
from controlstack.world.figures import PERSON_POSES
from controlstack.world.scene import Entity

MAX_MENTIONS = 4
MIN_PIXELS_FRACTION = 0.002  # an entity must cover this much of the image to be mentioned
NOUNS = ("sphere", "cube", "box", "cylinder", "cone", "ring", "person", *palette.SPECIES)
RELATIONS = ("left of", "right of", "in front of", "behind")
FUNCTION_WORDS = ("a", "an", "on", "and", "in", "of", "left", "right", "front", "behind", "empty", "scene")

VOCABULARY: list[str] = sorted(
    set(FUNCTION_WORDS)
    | set(palette.COLOR_NAMES)
    | {w for w in palette.TEXTURE_WORDS.values() if w}
    | {palette.SPOTTED}
    | set(NOUNS)
    | set(PERSON_POSES)
    | set(palette.GROUNDS)
) + [","]


def caption_words(text: str) -> list[str]:
    """Split a caption into vocabulary items (words and commas)."""
    return re.findall(r"[a-z]+|,", text)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def phrase(entity: Entity) -> str:
    """Noun phrase for an entity: ``a red striped sphere``, ``a running person in blue``,
    ``a brown dog``, ``a wooden cube``."""
    w = entity.words
    if entity.kind == "object":
        adjs = [w.get("color", ""), palette.TEXTURE_WORDS[w["texture"]]]
        words = [a for a in adjs if a] + [w["noun"]]
    elif entity.kind == "person":
        words = ([w["pose"]] if w["pose"] != "standing" else []) + ["person", "in", w["color"]]
    else:
        words = [w["color"], entity.cls]
    return f"{_article(words[0])} {' '.join(words)}"


def relation(a: tuple[float, float], b: tuple[float, float], size: int) -> str:
    """Relation of entity ``a`` to ``b`` from (screen x centroid, mean depth)."""
    dx = a[0] - b[0]
    if abs(dx) > 0.08 * size:
        return "left of" if dx < 0 else "right of"
    return "in front of" if a[1] < b[1] else "behind"


def caption(entities: list[Entity], ground: str, instance: np.ndarray, depth: np.ndarray) -> str:
    """Caption of a rendered scene (``instance`` and ``depth`` from its G-buffer)."""
    size = instance.shape[0]
    counts = np.bincount(instance.ravel(), minlength=256)
    min_pixels = max(4, int(MIN_PIXELS_FRACTION * instance.size))
    visible = [e for e in entities if counts[e.instance] >= min_pixels]
    visible.sort(key=lambda e: -counts[e.instance])
    visible = visible[:MAX_MENTIONS]
    if not visible:
        return f"an empty scene on {ground}"
    # Per-instance mean column and mean depth, for all instances in two bincounts.
    flat = instance.ravel()
    cols = np.tile(np.arange(size, dtype=np.float64), size)
    mean_x = np.bincount(flat, weights=cols, minlength=256) / np.maximum(counts, 1)
    mean_z = np.bincount(flat, weights=np.minimum(depth.ravel(), 1e3), minlength=256) / np.maximum(counts, 1)
    stats = {e.instance: (mean_x[e.instance], mean_z[e.instance]) for e in visible}
    clauses = []
    for i in range(0, len(visible), 2):
        a = visible[i]
        if i + 1 < len(visible):
            b = visible[i + 1]
            clauses.append(f"{phrase(a)} {relation(stats[a.instance], stats[b.instance], size)} {phrase(b)}")
        else:
            clauses.append(phrase(a))
    return f"{', '.join(clauses)} on {ground}"
