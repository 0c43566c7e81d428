"""Fixtures of the model tests: an empty compiled-graph cache per test module (``models/compiled.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """``CONTROLSTACK_CACHE`` pointed at a fresh folder for the module: its graphs compile once there."""
    folder = tmp_path_factory.mktemp("compiled-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONTROLSTACK_CACHE", str(folder))
        yield folder
