"""A folder of the user's photos -> a ``datasets`` folder the recipes train on: ``image``, ``text`` and
one column per annotator (``controlstack dataset build``).

The photos are cut into chunks; each chunk is annotated and written as its own small dataset in a
parts folder beside ``--out`` (atomically: a chunk is there whole or not at all), so a build that is
killed resumes where it stopped, and processes share the work by chunk number: ``--workers`` local
processes, and under ``accelerate launch`` (or any launcher that sets ``RANK`` / ``WORLD_SIZE``) one
process per rank takes the chunks ``i`` with ``i % WORLD_SIZE == RANK``. Rank 0 merges the parts in
chunk order once all are there -- so one process and several give the same dataset, row for row.

A photo that cannot be read (a corrupt file, a size outside the limits) is skipped and listed in
``<out>/skipped.txt`` with its reason, never fatal. Captions come from ``--captions CSV`` (columns
``file,text``, paths relative to the photos folder), else from a ``.txt`` file beside each photo,
else are empty (the recipes' caption dropout trains such rows as unconditional).
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from controlstack import annotators
from controlstack.errors import ControlstackError, require
from controlstack.io.images import load_image, to_rgb

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CHUNK = 32  # photos per part: small enough that a kill loses little, large enough that parts stay few


def list_photos(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    require(folder.is_dir(), f"photos folder '{folder}' does not exist; pass a folder of images")
    photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    require(photos, f"no images ({', '.join(SUFFIXES)}) in '{folder}'")
    return photos


def read_captions(folder: Path, photos: list[Path], captions: str | os.PathLike | None) -> list[str]:
    """One caption per photo: the CSV's (``file,text``), else the ``.txt`` beside it, else ""."""
    table: dict[str, str] = {}
    if captions is not None:
        path = Path(captions)
        require(path.is_file(), f"--captions '{path}' does not exist; pass a CSV with columns file,text")
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            require(reader.fieldnames is not None and {"file", "text"} <= set(reader.fieldnames),
                    f"--captions '{path}' needs the columns file,text (it has {', '.join(reader.fieldnames or [])})")
            table = {row["file"]: row["text"] for row in reader}
    out = []
    for p in photos:
        rel = p.relative_to(folder).as_posix()
        side = p.with_suffix(".txt")
        out.append(table.get(rel, side.read_text(encoding="utf-8").strip() if side.is_file() else ""))
    return out


def features(names: list[str]):
    from datasets import Features, Value  # local: heavy, only this path needs it
    from datasets import Image as ImageFeature  # local: heavy, only this path needs it

    return Features({"image": ImageFeature(), "text": Value("string"), **{n: ImageFeature() for n in names}})


def _png(image: Image.Image) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def annotate_chunk(job: tuple) -> tuple[dict, list[str]]:
    """One chunk: ``(columns, skipped)``; each photo read, resized (``size``: its shorter side, 0 keeps
    it), annotated by every name in ``names``; a photo that fails is skipped with its reason."""
    paths, texts, names, size = job
    takes_resolution = {n: "resolution" in {f.name for f in annotators.annotator_class(n).parameters()} for n in names}
    columns: dict = {"image": [], "text": [], **{n: [] for n in names}}
    skipped = []
    for path, text in zip(paths, texts):
        try:
            image = to_rgb(load_image(path))
            if size and min(image.size) != size:
                s = size / min(image.size)
                image = image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), Image.LANCZOS)
            made = {n: condition(n, image, takes_resolution[n]) for n in names}
        except (ControlstackError, OSError, ValueError) as exc:
            skipped.append(f"{path}: {str(exc).splitlines()[0]}")
            continue
        columns["image"].append(_png(image))
        columns["text"].append(text)
        for n, cond in made.items():
            columns[n].append(_png(cond))
    return columns, skipped


def condition(name: str, image: Image.Image, takes_resolution: bool) -> Image.Image:
    """``name``'s condition of ``image`` at the image's own size, pixel for pixel (detected at that
    resolution where the annotator has one: sd-webui's pixel-perfect)."""
    tool = annotators.get(name, **({"resolution": min(image.size)} if takes_resolution else {}))
    cond = to_rgb(tool(image))
    return cond if cond.size == image.size else cond.resize(image.size, Image.BILINEAR)


def _write_part(parts: Path, index: int, columns: dict, skipped: list[str], names: list[str]) -> None:
    from datasets import Dataset  # local: heavy, only this path needs it

    final, tmp = parts / f"chunk-{index:06d}", parts / f".chunk-{index:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset.from_dict(columns, features=features(names)).save_to_disk(str(tmp))
    (tmp / "skipped.txt").write_text("".join(f"{s}\n" for s in skipped))
    os.replace(tmp, final)  # atomic: a part is whole or absent, so a killed build resumes from it


def rank_and_world() -> tuple[int, int]:
    """This process's share: ``RANK`` / ``WORLD_SIZE`` as ``accelerate launch`` (torchrun) sets them."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    require(0 <= rank < world, f"RANK {rank} is outside WORLD_SIZE {world}")
    return rank, world


def build_dataset(photos: str | os.PathLike, out: str | os.PathLike, names: list[str], *,
                  captions: str | os.PathLike | None = None, workers: int = 1, size: int = 0,
                  chunk: int = CHUNK, rank: int | None = None, world: int | None = None,
                  progress: bool = True, wait_s: float = 3600.0) -> Path | None:
    """Build (or resume building) the dataset; returns ``out`` from the process that merged it (rank 0),
    None from the others."""
    require(names, "give at least one annotator (--annotators canny,depth,...)")
    for n in names:
        annotators.annotator_class(n)  # unknown names: one line listing the known ones
    require(workers >= 1 and chunk >= 1 and size >= 0, "--workers must be >= 1 and --size >= 0")
    if rank is None or world is None:
        rank, world = rank_and_world()
    folder, out = Path(photos), Path(out)
    paths = list_photos(folder)
    texts = read_captions(folder, paths, captions)
    require(not (out.exists() and any(out.iterdir())), f"--out '{out}' is not empty; choose another directory")
    parts = out.parent / f".{out.name}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    manifest = json.dumps({"photos": [p.relative_to(folder).as_posix() for p in paths], "annotators": list(names),
                           "size": size, "chunk": chunk, "captions": texts}, sort_keys=True)
    stamp = parts / "build.json"
    if stamp.is_file() and stamp.read_text() != manifest:  # a resume must be the same build, or parts would mix
        raise ControlstackError(f"'{parts}' holds the parts of another build (other photos, annotators, size or "
                                f"captions); delete it to start over, or rerun that build")
    stamp.write_text(manifest)
    chunks = [(i, paths[s:s + chunk], texts[s:s + chunk]) for i, s in enumerate(range(0, len(paths), chunk))]
    mine = [c for c in chunks if c[0] % world == rank and not (parts / f"chunk-{c[0]:06d}").is_dir()]
    jobs = [([str(p) for p in ps], ts, list(names), size) for _, ps, ts in mine]
    bar = tqdm(total=sum(len(ps) for _, ps, _ in mine), unit="photo", desc=f"dataset build ({rank}/{world})",
               disable=not progress)
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(annotate_chunk, jobs) if pool is not None else map(annotate_chunk, jobs)
        for (index, ps, _), (columns, skipped) in zip(mine, results):
            _write_part(parts, index, columns, skipped, names)
            bar.update(len(ps))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    if rank != 0:
        return None
    return _merge(parts, out, [i for i, _, _ in chunks], wait_s)


def _merge(parts: Path, out: Path, indices: list[int], wait_s: float) -> Path:
    """Rank 0: once every part is there, the parts in chunk order -> ``out`` (and its skipped.txt)."""
    from datasets import concatenate_datasets, load_from_disk  # local: heavy, only this path needs it

    folders = [parts / f"chunk-{i:06d}" for i in indices]
    deadline = time.monotonic() + wait_s
    while not all(f.is_dir() for f in folders):  # the other ranks' chunks
        missing = [f.name for f in folders if not f.is_dir()]
        if time.monotonic() > deadline:
            raise ControlstackError(f"{len(missing)} chunks never arrived ({missing[0]}, ...); run the other ranks "
                                    "again (a build resumes), then this one")
        time.sleep(2.0)
    merged = concatenate_datasets([load_from_disk(str(f)) for f in folders])
    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_to_disk(str(tmp))
    (tmp / "skipped.txt").write_text("".join((f / "skipped.txt").read_text() for f in folders))
    if out.exists():
        out.rmdir()  # empty: checked at the start
    os.replace(tmp, out)
    shutil.rmtree(parts)
    return out
