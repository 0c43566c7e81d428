"""The procedural world: seeded scenes with exact ground truth for every ControlNet condition.

numpy (+ OpenCV) only -- no torch -- so it runs inside dataloader workers::

    from controlstack.world import WorldConfig, sample_scene, render
    scene = sample_scene(seed=0, config=WorldConfig())
    row = render(scene, size=128)        # dict keyed by COLUMNS: image, text, depth, ...

``export_dataset`` writes many scenes to a Hugging Face ``datasets`` folder (``docs/world.md``).
"""

from controlstack.world.captions import VOCABULARY, caption_words
from controlstack.world.config import WorldConfig
from controlstack.world.render import COLUMNS, render
from controlstack.world.scene import Scene, sample_scene

HELD_OUT_SEED = 1_000_000  # scenes [HELD_OUT_SEED, i] are for evaluation and the demo; training exports use seed 0

__all__ = ["COLUMNS", "HELD_OUT_SEED", "VOCABULARY", "Scene", "WorldConfig", "caption_words", "render", "sample_scene"]
