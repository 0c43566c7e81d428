"""``controlstack annotate``: photo -> condition image with any registered annotator.

    controlstack annotate TYPE IMAGE [--param k=v ...] --out FILE
    controlstack annotate TYPE FOLDER [--param k=v ...] --out FOLDER     # batch, progress bar
    controlstack annotate --list

``--width/--height`` (with ``--resize-mode``) set the resolution "pixel perfect" for that target.
``pose`` also takes a ``.json`` file as IMAGE (rendered at its canvas size), and writes the edited
JSON when ``--out`` ends in ``.json``; ``pose_estimate`` with ``--out X.json`` writes the detected
skeletons (OpenPose people + AP-10K animals) instead of their drawing. Outputs are written to a
temporary name and renamed, so a failure never leaves a partial file.
"""

from __future__ import annotations

import os
from pathlib import Path

from controlstack import annotators
from controlstack.errors import ControlstackError
from controlstack.io.paths import output_file, output_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
OUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
               ".tif": "TIFF", ".tiff": "TIFF"}


def register(sub) -> None:
    p = sub.add_parser("annotate", help="turn a photo into a condition image (canny, pose, ...)",
                       description="Run an annotator on an image (or every image in a folder).")
    p.add_argument("type", nargs="?", help="annotator name (see --list)")
    p.add_argument("image", nargs="?", help="input image, folder of images, or pose .json")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="annotator parameter; repeatable (see --list for names and ranges)")
    p.add_argument("--out", help="output file (or folder when IMAGE is a folder)")
    p.add_argument("--width", type=int, help="target width: pick the resolution pixel-perfect for it")
    p.add_argument("--height", type=int, help="target height (with --width)")
    p.add_argument("--resize-mode", default="just_resize",
                   help="just_resize, crop_and_resize or resize_and_fill (for --width/--height)")
    p.add_argument("--list", action="store_true", help="list annotators and their parameters")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a folder of images shows one)")
    p.set_defaults(func=run)


def list_text() -> str:
    lines = []
    for name in annotators.available():
        cls = annotators.annotator_class(name)
        note = annotators.photo_note(name)
        tag = f" ({note})" if note else ""
        doc = (cls.__module__.rsplit(".", 1)[-1])
        lines.append(f"{name}{tag}  [{doc}]")
        for pname, tname, default, rng, help_ in cls.describe():
            lines.append(f"    {pname}: {tname} = {default!r}  ({rng})  {help_}")
    return "\n".join(lines)


def parse_pairs(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ControlstackError(f"--param '{item}' must look like NAME=VALUE")
        out[key.strip()] = value
    return out


def out_format(path: Path) -> str:
    fmt = OUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ControlstackError(f"--out '{path}' needs an image suffix: {', '.join(OUT_FORMATS)}")
    return fmt


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename onto ``path``; the temporary file is removed on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def run(args) -> int:
    if args.list:
        print(list_text())
        return 0
    if not args.type or not args.image:
        raise ControlstackError("annotate needs TYPE and IMAGE (or --list); e.g. "
                                "controlstack annotate canny photo.png --out edges.png")
    if not args.out:
        raise ControlstackError("annotate needs --out FILE (or --out FOLDER for a folder of images)")
    from controlstack.io.images import load_image  # local: keeps CLI start-up light

    cls = annotators.annotator_class(args.type)
    params = cls.parse(parse_pairs(args.param))

    src, out = Path(args.image), Path(args.out)
    output_folder(out) if src.is_dir() else output_file(out)  # a bad --out fails before any work
    is_json = args.type == "pose" and src.suffix.lower() == ".json"
    if is_json:
        params["json"] = str(src)
    annotator = annotators.get(args.type, **params)  # bad parameters fail before any output
    if (args.width is None) != (args.height is None):
        raise ControlstackError("pass both --width and --height (or neither)")
    if args.width is not None and (args.width < 1 or args.height < 1):
        raise ControlstackError("--width and --height must be positive")

    def sized(size):
        """The annotator at the pixel-perfect resolution for --width/--height (as it is without);
        ``size()`` gives the input's size, asked only when needed (a pose JSON is read for it)."""
        if args.width is None:
            return annotator
        return annotator.pixel_perfect(size(), args.width, args.height, args.resize_mode)

    def annotate(path: Path | None):
        image = load_image(path) if path is not None else None
        a = sized(lambda: image.size if image is not None else _json_size(annotator))
        return a(image) if image is not None else a()

    if is_json:
        if out.suffix.lower() == ".json":
            from controlstack.annotators import pose as P  # local: keeps CLI start-up light

            edited = annotator.edited()
            atomic_write(out, lambda tmp: P.write_openpose_json(edited, tmp))
        else:
            fmt = out_format(out)
            result = annotate(None)
            atomic_write(out, lambda tmp: result.save(tmp, format=fmt))
        print(out)
        return 0

    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ControlstackError(f"folder '{src}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
        if out.exists() and not out.is_dir():
            raise ControlstackError(f"--out '{out}' is a file; IMAGE is a folder, so pass an output folder")
        from tqdm import tqdm  # local: keeps CLI start-up light

        for path in tqdm(files, desc=f"annotate {args.type}", unit="img", disable=args.no_progress):
            result = annotate(path)
            target = out / (path.stem + ".png")
            atomic_write(target, lambda tmp, result=result: result.save(tmp, format="PNG"))
        print(f"{len(files)} images -> {out}")
        return 0

    if args.type == "pose_estimate" and out.suffix.lower() == ".json":  # the keypoints, not the drawing
        from controlstack.annotators import pose as P  # local: keeps CLI start-up light

        image = load_image(src)
        found = sized(lambda: image.size).estimate(image)
        atomic_write(out, lambda tmp: P.write_openpose_json(found, tmp))
        print(out)
        return 0
    fmt = out_format(out)
    result = annotate(src)
    atomic_write(out, lambda tmp: result.save(tmp, format=fmt))
    print(out)
    return 0


def _json_size(annotator) -> tuple[int, int]:
    pose = annotator.edited()
    return pose.width, pose.height
