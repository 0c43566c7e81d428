"""The world's fixed vocabularies: colours, textures, semantic classes and their palette.

Semantic colours reuse the ADE20K palette (the one ControlNet's segmentation model was trained
with, ``annotator/uniformer`` in ControlNet 1.0) for the classes ADE20K has: sky
``(6, 230, 230)``, earth/ground ``(120, 120, 70)``, person ``(150, 5, 61)``, box ``(255, 0, 102)``
... and fixed distinct colours for the rest. Class ids are positions in :data:`CLASSES`.
"""

from __future__ import annotations

import numpy as np

# Named colours (RGB 0..255). The caption names exactly these.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30),
    "orange": (235, 120, 20),
    "yellow": (235, 210, 40),
    "green": (40, 160, 50),
    "blue": (35, 70, 200),
    "cyan": (40, 190, 210),
    "purple": (120, 50, 170),
    "pink": (235, 120, 170),
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
    "brown": (120, 75, 35),
}
COLOR_NAMES = tuple(COLORS)

# Surface textures for objects; caption adjective for each ("" = plain, not mentioned).
TEXTURES = ("plain", "striped", "checkered", "speckled", "wooden")
TEXTURE_WORDS = {
    "plain": "",
    "striped": "striped",
    "checkered": "checkered",
    "speckled": "speckled",
    "wooden": "wooden",
}
# Internal-only texture for animal coats (cow patches); captions call it "spotted".
SPOTTED = "spotted"

SHAPES = ("sphere", "box", "cylinder", "cone", "torus")
SPECIES = ("dog", "cat", "horse", "cow")
GROUNDS = ("grass", "sand", "snow", "dirt", "tiles")

# Semantic classes: id = index. "sky" is 0 so an all-zero map means nothing was hit.
CLASSES: tuple[str, ...] = ("sky", "ground", *SHAPES, "person", *SPECIES)
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}

PALETTE = np.array(
    [
        (6, 230, 230),  # sky (ADE20K sky)
        (120, 120, 70),  # ground (ADE20K earth)
        (255, 184, 6),  # sphere
        (255, 0, 102),  # box (ADE20K box)
        (0, 122, 255),  # cylinder
        (255, 92, 0),  # cone
        (163, 0, 255),  # torus
        (150, 5, 61),  # person (ADE20K person)
        (0, 255, 20),  # dog
        (255, 0, 204),  # cat
        (255, 255, 0),  # horse
        (0, 61, 255),  # cow
    ],
    dtype=np.uint8,
)
assert len(PALETTE) == len(CLASSES)

# Ground materials: (base colour, secondary colour, texture, texture frequency per metre).
GROUND_MATERIALS = {
    "grass": ((70, 130, 45), (40, 95, 30), "speckled", 2.0),
    "sand": ((205, 180, 130), (175, 150, 105), "speckled", 3.0),
    "snow": ((235, 238, 245), (205, 212, 228), "speckled", 1.0),
    "dirt": ((115, 85, 55), (85, 60, 40), "speckled", 2.5),
    "tiles": ((165, 160, 150), (120, 115, 110), "checkered", 1.0),
}

# Animal coats per species: list of (caption colour word, base colour, secondary, texture).
COATS = {
    "dog": [
        ("brown", (120, 75, 35), (90, 55, 25), "plain"),
        ("black", (30, 28, 26), (60, 55, 50), "plain"),
        ("white", (230, 225, 215), (200, 190, 175), "plain"),
        ("yellow", (215, 170, 90), (185, 140, 70), "plain"),
    ],
    "cat": [
        ("gray", (120, 120, 125), (80, 80, 85), "striped"),
        ("orange", (225, 130, 45), (180, 95, 30), "striped"),
        ("black", (25, 25, 28), (45, 45, 50), "plain"),
        ("white", (235, 232, 228), (210, 205, 200), "plain"),
    ],
    "horse": [
        ("brown", (110, 65, 30), (80, 45, 20), "plain"),
        ("black", (28, 25, 25), (50, 45, 45), "plain"),
        ("white", (230, 228, 222), (200, 195, 190), "plain"),
        ("gray", (140, 138, 135), (100, 98, 95), "plain"),
    ],
    "cow": [
        ("spotted", (235, 232, 225), (30, 28, 28), SPOTTED),
        ("brown", (125, 75, 40), (235, 225, 210), SPOTTED),
        ("black", (30, 28, 28), (60, 55, 55), "plain"),
    ],
}

SKIN_TONES = ((241, 194, 160), (224, 172, 130), (198, 134, 90), (141, 85, 54), (92, 56, 36))
HAIR_COLORS = ((30, 25, 20), (90, 60, 30), (180, 140, 80), (130, 130, 130))

# Skies: (zenith colour, horizon colour, sun colour, ambient level).
SKIES = (
    ((70, 130, 215), (175, 205, 235), (255, 250, 235), 0.40),  # clear day
    ((150, 160, 175), (200, 205, 210), (220, 220, 220), 0.55),  # overcast
    ((60, 80, 150), (245, 170, 110), (255, 200, 150), 0.35),  # sunset
)
