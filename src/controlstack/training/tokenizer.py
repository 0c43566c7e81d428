"""The world's tokenizer: a CLIP tokenizer whose vocabulary words are single tokens.

CLIP's BPE (Radford et al. 2021) lower-cases, splits text into words and merges bytes into
sub-word tokens. A procedural world has a closed vocabulary, so every word gets its own token
(``models.tiny.byte_level_tokenizer(words=...)`` adds the merges that spell it) and any other text
still tokenizes, byte by byte. It is saved with ``save_pretrained`` in the standard layout
(vocab.json, merges.txt, tokenizer_config.json), so ``CLIPTokenizer.from_pretrained`` and
diffusers' pipelines load it like SD's own tokenizer.
"""

from __future__ import annotations

import re

from controlstack.errors import ControlstackError
from controlstack.models.tiny import byte_level_tokenizer

VOCABULARY_SOURCES = ("world", "dataset", "bytes")
_WORD = re.compile(r"[a-z]+")


def world_vocabulary() -> list[str]:
    try:
        from controlstack.world.captions import VOCABULARY  # local: optional dependency
    except ImportError:
        raise ControlstackError(
            "the world's caption vocabulary (controlstack.world.captions) is not available; "
            "set vocabulary: dataset"
        ) from None
    return list(VOCABULARY)


def caption_words(captions) -> list[str]:
    """Every distinct lower-case word in ``captions``, sorted (CLIP's pre-tokenizer lower-cases)."""
    words: set[str] = set()
    for text in captions:
        words.update(_WORD.findall(str(text).lower()))
    return sorted(words)


def build_tokenizer(source: str, max_length: int, captions=()):
    """``source``: ``world`` (the world's VOCABULARY), ``dataset`` (words of ``captions``) or
    ``bytes`` (no whole words: byte-level only)."""
    if source == "world":
        words = world_vocabulary()
    elif source == "dataset":
        words = caption_words(captions)
    elif source == "bytes":
        words = []
    else:
        raise ControlstackError(f"unknown vocabulary '{source}'; choose one of {', '.join(VOCABULARY_SOURCES)}")
    # sorted + deduplicated so that the same words always give the same token ids
    words = sorted({w.lower() for w in words if w and w.isalpha()})
    return byte_level_tokenizer(max_length=max_length, words=words)
