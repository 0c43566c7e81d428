"""Typed configuration of the procedural world (validated on construction)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from controlstack.errors import ControlstackError, require

MIN_SIZE, MAX_SIZE = 32, 1024
MAX_ENTITIES = 12


def check_size(size: int) -> int:
    """Validate an image side length (pixels): a multiple of 8 in ``[32, 1024]``."""
    require(
        isinstance(size, int)
        and not isinstance(size, bool)
        and MIN_SIZE <= size <= MAX_SIZE
        and size % 8 == 0,
        f"world size must be a multiple of 8 between {MIN_SIZE} and {MAX_SIZE} (e.g. 64, 128, 256, 512), "
        f"got {size!r}",
    )
    return size


@dataclass(frozen=True)
class WorldConfig:
    """What a scene may contain and how large it renders.

    ``objects``, ``people``, ``animals``: inclusive ``(min, max)`` counts drawn uniformly per
    scene (an entity that finds no free spot on the ground after a few tries is dropped).
    ``shadows``: cast shadows from the sun (off only for profiling).
    """

    size: int = 128
    objects: tuple[int, int] = (1, 4)
    people: tuple[int, int] = (0, 2)
    animals: tuple[int, int] = (0, 2)
    shadows: bool = True

    def __post_init__(self) -> None:
        check_size(self.size)
        for name in ("objects", "people", "animals"):
            value = getattr(self, name)
            ok = (
                isinstance(value, (tuple, list))
                and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                and 0 <= value[0] <= value[1] <= MAX_ENTITIES
            )
            require(
                ok,
                f"WorldConfig.{name} must be a (min, max) pair of ints with 0 <= min <= max <= "
                f"{MAX_ENTITIES}, got {value!r}",
            )
            object.__setattr__(self, name, tuple(value))
        require(
            self.objects[1] + self.people[1] + self.animals[1] <= MAX_ENTITIES,
            f"a world scene holds at most {MAX_ENTITIES} entities; lower the maximum counts",
        )
        require(
            isinstance(self.shadows, bool), f"WorldConfig.shadows must be true or false, got {self.shadows!r}"
        )

    @classmethod
    def from_dict(cls, data: dict) -> WorldConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ControlstackError(f"unknown WorldConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict:
        return asdict(self)
