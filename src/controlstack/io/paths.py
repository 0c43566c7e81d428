"""Output locations checked before any work: one line for a bad ``--out``, never an internal error.

A command that writes checks its destination first -- an existing file where a folder is meant,
a path under a file (``/dev/null/x``), a location that is not writable -- so a long run never ends
in a traceback with a temporary path, and nothing is written half (nor any folder created).
"""

from __future__ import annotations

import os
from pathlib import Path

from controlstack.errors import ControlstackError


def _creatable(folder: Path, flag: str, shown: Path | None = None) -> None:
    """``folder`` exists as a writable folder, or can be created (its first existing ancestor is a
    writable folder). Nothing is created here: a command that fails later leaves no empty folder."""
    shown = folder if shown is None else shown
    for parent in (folder, *folder.resolve().parents):  # the first existing ancestor decides
        if parent.exists():
            if not parent.is_dir():
                raise ControlstackError(f"{flag} '{shown}': '{parent}' is a file, not a folder; pass another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ControlstackError(f"{flag} '{shown}': '{parent}' is not writable; pass a writable location")
            return


def output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder the command will write files into."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ControlstackError(f"{flag} '{folder}' is a file; pass a folder")
    _creatable(folder, flag)
    return folder


def output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A file the command will write (its folder is created if needed)."""
    file = Path(path)
    if file.is_dir():
        raise ControlstackError(f"{flag} '{file}' is a folder; pass a file name")
    _creatable(file.parent if str(file.parent) else Path("."), flag, file)
    return file


def output_parent(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A path whose parent folder the command writes into (e.g. a dataset renamed onto it at the end)."""
    path = Path(path)
    _creatable(path.parent if str(path.parent) else Path("."), flag, path)
    return path
