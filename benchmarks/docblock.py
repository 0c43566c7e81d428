"""The one way the benchmarks write their numbers into a doc: the lines between two HTML-comment
markers are replaced, the rest of the file is kept (a missing file gets just the block)."""

from __future__ import annotations

from pathlib import Path


def write_block(doc: Path, start: str, end: str, lines: list[str]) -> None:
    text = doc.read_text() if doc.is_file() else f"{start}\n{end}\n"
    head, rest = text.split(start, 1)
    doc.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])
