"""PNG output with the generation parameters in a text chunk, as sd-webui writes them.

sd-webui stores one ``parameters`` tEXt chunk::

    a red sphere
    Negative prompt: blurry
    Steps: 20, Sampler: unipc, CFG scale: 7.5, Seed: 0, Size: 512x512, Model: ..., ControlNet 0: "..."

Tools that read sd-webui PNGs (PNG Info, civitai, ComfyUI loaders) understand that layout, so
we write the same chunk, plus ``controlstack`` with the exact parameters as JSON for round trips.
Writes are atomic (temp file + rename): a failure never leaves a half-written PNG.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from controlstack.hires import UPSCALER_TABLE
from controlstack.injection.modes import CONTROL_MODE_TABLE
from controlstack.inpaint import FILL_TABLE
from controlstack.io.images import RESIZE_TABLE
from controlstack.sampling.schedulers import WEBUI_SAMPLER_LABELS

#: our names -> how sd-webui spells them in its infotext (samplers, control modes, resize modes),
#: views of the one table of each vocabulary (sampling, injection.modes, io.images)
SAMPLERS = dict(WEBUI_SAMPLER_LABELS)
UPSCALERS = {u.name: u.webui for u in UPSCALER_TABLE}
FILLS = {f.name: f.webui for f in FILL_TABLE}
CONTROL_MODES = {m.name: m.webui for m in CONTROL_MODE_TABLE}
RESIZE_MODES = {r.name: r.webui for r in RESIZE_TABLE}


def format_parameters(params: dict) -> str:
    """The sd-webui ``parameters`` text for one image (its spellings; our own modes as they are)."""
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    sampler = params.get("scheduler")
    # sd-webui's Size is the first pass's under the hires fix (Hires upscale says how much larger)
    width, height = params.get("hires", {}).get("first_pass") or (params.get("width"), params.get("height"))
    fields = [
        f"Steps: {params.get('steps')}", f"Sampler: {SAMPLERS.get(sampler, sampler)}",
        f"CFG scale: {params.get('cfg')}", f"Seed: {params.get('seed')}",
        f"Size: {width}x{height}",
        *([f"Model hash: {params['model_hash']}"] if params.get("model_hash") else []), f"Model: {params.get('model')}",
    ]
    # SDXL micro-conditioning, when set; sizes as "Size:" spells them (width x height), crop as top,left
    for key, label in (("original_size", "Original size"), ("target_size", "Target size")):
        if params.get(key) is not None:
            fields.append(f"{label}: {params[key][1]}x{params[key][0]}")
    if params.get("crops_coords_top_left") is not None:
        fields.append("Crop top-left: {},{}".format(*params["crops_coords_top_left"]))
    if "batch_pos" in params:
        fields.append(f"Batch pos: {params['batch_pos']}")
    if "img2img" in params:
        fields.append(f"Denoising strength: {params['img2img']['strength']}")
    if params.get("loras"):  # sd-webui's: each LoRA's name and short hash
        listed = ", ".join(f"{lo['name']}: {lo['hash']}" for lo in params["loras"])
        fields.append(f'Lora hashes: "{listed}"')
    inpaint = params.get("img2img", {}).get("inpaint_options")
    if inpaint:  # sd-webui's inpainting fields
        fields += [f"Mask blur: {inpaint['mask_blur']}",
                   f"Inpaint area: {'Only masked' if inpaint['full_res'] else 'Whole picture'}",
                   *([f"Masked area padding: {inpaint['padding']}"] if inpaint["full_res"] else []),
                   f"Masked content: {FILLS.get(inpaint['fill'], inpaint['fill'])}",
                   *(["Mask mode: Inpaint not masked"] if inpaint["invert"] else [])]
    if "hires" in params:  # sd-webui's hires fix fields
        hires = params["hires"]
        fields += [f"Denoising strength: {hires['strength']}", f"Hires upscale: {hires['scale']}",
                   *([f"Hires steps: {hires['steps']}"] if hires.get("steps") else []),
                   f"Hires upscaler: {UPSCALERS.get(hires.get('upscaler', 'lanczos'), hires.get('upscaler'))}"]
    for i, c in enumerate(params.get("controls", [])):
        # a schedule in the CLI's own syntax (P@W,P@W): readers split a unit's fields on ", "
        weight = c["weight"] if isinstance(c["weight"], float) else ",".join(f"{p:g}@{w:g}" for p, w in c["weight"])
        module = c.get("module") or (c.get("preprocess") if isinstance(c.get("preprocess"), str) else None) or "none"
        mode = params.get("mode")
        fields.append(
            f'ControlNet {i}: "Module: {module}, Model: {c["model"]}, '
            f'Weight: {weight}, Guidance Start: {c["start"]}, Guidance End: {c["end"]}, '
            f'Resize Mode: {RESIZE_MODES.get(c["resize_mode"], c["resize_mode"])}, '
            f'Control Mode: {CONTROL_MODES.get(mode, mode)}, Mask: {c["mask"]}"'
        )
    lines.append(", ".join(fields))
    return "\n".join(lines)


def atomic_save(image: Image.Image, path: str | os.PathLike, params: dict | None = None) -> Path:
    """Save ``image`` as PNG at ``path`` (with metadata when ``params``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text("parameters", format_parameters(params))
        info.add_text("controlstack", json.dumps(params, default=str))
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; users expect their umask, as any writer gives
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_parameters(path: str | os.PathLike) -> dict:
    """The text chunks of a PNG (``parameters`` and ``controlstack``), JSON decoded where JSON."""
    with Image.open(path) as im:
        text = dict(im.text)
    if "controlstack" in text:
        text["controlstack"] = json.loads(text["controlstack"])
    return text


def parse_parameters(text: str, typed: bool = True) -> dict:
    """sd-webui's ``parameters`` text -> ``{"prompt", "negative_prompt", field: value, ...}`` (its
    own parser's rules: the last line holds ``Key: value`` pairs separated by ", ", a value in
    double quotes may hold commas; every earlier line is the prompt, then ``Negative prompt:``).
    Values stay strings except, where ``typed``, the numbers of Steps, CFG scale, Seed, and Size
    split into ``width`` / ``height``."""
    lines = text.strip().split("\n") if isinstance(text, str) else []
    out: dict = {"prompt": "", "negative_prompt": ""}
    pairs = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    last = lines[-1] if lines else ""
    if len(pairs.findall(last)) < 3:  # no settings line: the whole text is the prompt
        last = ""
    else:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line.strip())
    out["prompt"], out["negative_prompt"] = "\n".join(prompt), "\n".join(negative)
    for key, value in pairs.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        out[key.strip()] = value
    if not typed:
        return out
    for key, kind in (("Steps", int), ("Seed", int), ("CFG scale", float)):
        try:
            out[key] = kind(out[key]) if key in out else out.get(key)
        except ValueError:
            pass
    if isinstance(out.get("Size"), str) and re.fullmatch(r"\d+x\d+", out["Size"]):
        out["width"], out["height"] = (int(v) for v in out["Size"].split("x"))
    return {k: v for k, v in out.items() if v is not None}


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized images in rows of ``cols`` (default: about square)."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


def make_labelled_grid(rows: list[tuple[str, list[Image.Image]]], columns: list[str], pad: int = 2) -> Image.Image:
    """Rows of equally sized tiles with a title above each column and a label left of each row
    (PIL's built-in font, so it works offline with no font files)."""
    w, h = rows[0][1][0].size
    font = ImageFont.load_default(size=max(10, h // 10))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda s: int(probe.textlength(s, font=font))  # noqa: E731
    label_w = max(text_w(label) for label, _ in rows) + 2 * pad + 4
    title_h = max(14, h // 7) + 2 * pad
    cols = max(len(tiles) for _, tiles in rows)
    grid = Image.new("RGB", (label_w + cols * (w + pad), title_h + len(rows) * (h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(columns[:cols]):
        x = label_w + c * (w + pad) + (w - text_w(title)) // 2
        draw.text((x, pad), title, fill=(0, 0, 0), font=font)
    for r, (label, tiles) in enumerate(rows):
        y = title_h + r * (h + pad)
        draw.text((pad, y + h // 2 - font.size // 2), label, fill=(0, 0, 0), font=font)
        for c, im in enumerate(tiles):
            grid.paste(im.convert("RGB").resize((w, h)), (label_w + c * (w + pad), y))
    return grid
