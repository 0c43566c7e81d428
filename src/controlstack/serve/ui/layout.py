"""The gradio Blocks: the widgets, laid out as sd-webui / sd-webui-controlnet users know them, and
wired to the plain functions of :mod:`.run`, :mod:`.units` and :mod:`.pnginfo`."""

from __future__ import annotations

import os
from pathlib import Path

from controlstack.errors import ControlstackError
from controlstack.hires import UPSCALER_TABLE
from controlstack.injection.modes import CONTROL_MODE_TABLE
from controlstack.inpaint import FILL_TABLE
from controlstack.io.images import RESIZE_TABLE
from controlstack.sampling.schedulers import SAMPLER_TABLE
from controlstack.serve.ui import pnginfo, units
from controlstack.serve.ui.run import (
    DEFAULT_RESIZE,
    RECOMMENDED,
    Hires,
    Img2img,
    Unit,
    generate,
    job_control,
    preview,
    split_mask,
)

UNITS = 3
#: a bright brush shows on dark and light images alike (gradio's ImageMask default is black)
BRUSH_COLORS = ["#ff00ff", "#ffffff", "#00ffff"]
IMAGE_INFO = ("Draw on the image to mask where this unit's control acts (undrawn: everywhere). "
              "Uploading an image enables the unit.")
PREPROCESSOR_INFO = ("learned ones are trained on the procedural world: reliable on its scenes, not on "
                     "photographs; on a photo use canny, softedge, lineart, lines or scribble (controlstack "
                     "annotate --list says more)")
HEADER = "# controlstack\nSpatial control for text-to-image diffusion (ControlNet, Minimal Impact, Omni)."
UNIT_FIELDS = 10  # Unit's fields before params, then the generic preprocessor widgets
SLOTS = units.SLIDERS + units.CHECKS + units.CHOICES


def default_outputs(backend) -> Path:
    """Where results go when ``build`` is given no folder: beside the embedded server's job store
    (``--data DIR``/outputs), else ``$XDG_DATA_HOME/controlstack/outputs`` (a broker front)."""
    store = getattr(backend, "store", None)
    if store is not None and getattr(store, "root", None) is not None:
        return Path(store.root) / "outputs"
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "controlstack" / "outputs"


def build(backend, limits, outputs=None):
    """The gradio Blocks over a ``backend`` (the package docstring: its base for the widgets, its queue
    for Generate, its interrupt / skip) and ``limits``; results are saved as PNGs with their parameters
    under ``outputs`` (None: :func:`default_outputs`)."""
    import gradio as gr  # local: heavy, only this path needs it

    from controlstack.serve.spec import MAX_N_ITER  # local: heavy, only this path needs it

    outputs = Path(outputs) if outputs is not None else default_outputs(backend)
    pipe = units.current_base(backend)  # None: a front started before any worker; Generate says why
    size = pipe.native_size if pipe is not None else 512
    recommended = pipe.recommended if pipe is not None else {}
    nets = sorted(pipe.controlnets) if pipe is not None else []
    samplers = [s.webui for s in SAMPLER_TABLE]
    brush = gr.Brush(colors=BRUSH_COLORS, default_color=BRUSH_COLORS[0], color_mode="defaults")
    with gr.Blocks(title="controlstack") as demo:
        gr.Markdown(HEADER)
        mode = gr.State("txt2img")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, value="a red cube on grass", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                with gr.Tabs() as tabs:
                    with gr.Tab("txt2img", id="txt2img") as tab_txt, \
                            gr.Accordion("Hires. fix", open=False) as hr_box:
                        hr_on = gr.Checkbox(label="Enable Hires. fix", value=False, elem_id="hires")
                        with gr.Row():
                            hr_up = gr.Dropdown([u.webui for u in UPSCALER_TABLE], value="Latent", label="Upscaler")
                            hr_scale = gr.Slider(1, 4, value=2.0, step=0.05, label="Upscale by")
                            hr_steps = gr.Slider(0, limits.max_steps, value=0, step=1, label="Hires steps",
                                                 info="0: as many as Sampling steps")
                            hr_strength = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength")
                    with gr.Tab("img2img / inpaint", id="img2img") as tab_img:
                        init = gr.ImageMask(label="Image for img2img", type="numpy", brush=brush,
                                            elem_id="img2img-image")
                        gr.Markdown("Draw on the image to inpaint only there (Generate repaints what is drawn); "
                                    "without a drawing the whole image is redrawn (img2img).")
                        with gr.Row():
                            strength = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength")
                            blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur")
                            mask_mode = gr.Radio(["Inpaint masked", "Inpaint not masked"], value="Inpaint masked",
                                                 label="Mask mode")
                        with gr.Row():
                            fill = gr.Radio([f.webui for f in FILL_TABLE], value="original", label="Masked content")
                            area = gr.Radio(["Whole picture", "Only masked"], value="Whole picture",
                                            label="Inpaint area")
                            padding = gr.Slider(0, 256, value=32, step=4, label="Only masked padding, pixels")
                    with gr.Tab("PNG Info", id="pnginfo"):
                        png = gr.Image(label="Source", type="filepath", image_mode=None, sources=["upload"],
                                       elem_id="pnginfo-image")
                        png_text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo-text")
                        png_fields = gr.State({})
                        to_txt = gr.Button("Send to txt2img")
                with gr.Row():
                    sampler = gr.Dropdown(samplers, value="UniPC", label="Sampling method")
                    steps = gr.Slider(1, limits.max_steps, value=recommended.get("steps", 20), step=1,
                                      label="Sampling steps", elem_id="steps")
                    cfg = gr.Slider(0, 30, value=recommended.get("cfg", 7.5), step=0.5, label="CFG Scale")
                with gr.Row():
                    width = gr.Slider(64, limits.max_side, value=size, step=8, label="Width", elem_id="width")
                    height = gr.Slider(64, limits.max_side, value=size, step=8, label="Height", elem_id="height")
                    batch = gr.Slider(1, limits.max_batch, value=1, step=1, label="Batch size")
                    n_iter = gr.Slider(1, MAX_N_ITER, value=1, step=1, label="Batch count", elem_id="n_iter")
                    seed = gr.Number(value=-1, precision=0, label="Seed", elem_id="seed")
                control_mode = gr.Radio([RECOMMENDED, *(m.webui for m in CONTROL_MODE_TABLE)], value=RECOMMENDED,
                                        label="Control Mode")
                unit_widgets = [unit_block(gr, i, backend, nets, size, brush, width, height) for i in range(UNITS)]
            with gr.Column(scale=2):
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", scale=2, elem_id="generate")
                    interrupt = gr.Button("Interrupt", variant="stop", scale=1, min_width=80, elem_id="interrupt")
                    skip = gr.Button("Skip", scale=1, min_width=80, elem_id="skip")
                # PNG: the files keep their parameters (gradio's default WebP would drop them); no uploads
                gallery = gr.Gallery(label="Output", columns=2, format="png", interactive=False, type="filepath",
                                     elem_id="gallery")
                info = gr.Textbox(label="Parameters", lines=6, elem_id="parameters")
                with gr.Row():
                    send = gr.Button("Send to ControlNet Unit 0")
                    send_img = gr.Button("Send to img2img")
        head = [mode, prompt, negative, sampler, steps, cfg, seed, width, height, batch, n_iter, control_mode,
                hr_on, hr_up, hr_scale, hr_steps, hr_strength, init, strength, blur, area, padding, fill, mask_mode]
        flat = [w for unit in unit_widgets for w in unit]

        def on_generate(*values, progress=gr.Progress()):  # noqa: B008 -- gradio injects it by this default
            (kind, prompt_, negative_, sampler_, steps_, cfg_, seed_, width_, height_, batch_, n_iter_, mode_,
             hr_on_, *rest) = values
            hires, rest = (Hires(*rest[:4]) if hr_on_ and kind == "txt2img" else None), rest[4:]
            img2img, rest = (Img2img(*rest[:7]) if kind == "img2img" else None), rest[7:]
            unit_values = [to_unit(rest[i:i + UNIT_FIELDS + SLOTS]) for i in range(0, len(rest), UNIT_FIELDS + SLOTS)]
            return safe(generate)(backend, limits, prompt_, negative_, sampler_, steps_, cfg_, seed_, width_, height_,
                                  batch_, mode_, unit_values, n_iter=n_iter_, hires=hires, img2img=img2img,
                                  progress=progress, outputs=outputs)

        # concurrency_limit=None: every click reaches the server's queue, whose bound answers past it
        # (gradio's own default, one at a time, would hold the others unseen and unbounded)
        run.click(on_generate, head + flat, [gallery, info], concurrency_limit=None)
        # not queued behind a running Generate: they must reach the job while it runs
        interrupt.click(lambda: gr.Info(safe(job_control)(backend, "interrupt")), None, None, concurrency_limit=None)
        skip.click(lambda: gr.Info(safe(job_control)(backend, "skip")), None, None, concurrency_limit=None)
        tab_txt.select(lambda: "txt2img", None, mode)
        tab_img.select(lambda: "img2img", None, mode)
        first = lambda g: g[0][0] if g else None
        send.click(lambda g: (first(g), bool(g)), gallery, [unit_widgets[0][1], unit_widgets[0][0]])
        send_img.click(lambda g: (first(g), gr.Tabs(selected="img2img"), "img2img"), gallery, [init, tabs, mode])
        png.change(safe(show_png_info), png, [png_text, png_fields])
        to_txt.click(lambda f: send_to_txt2img(gr, f, samplers), png_fields,
                     [prompt, negative, steps, sampler, cfg, seed, width, height, hr_on, hr_scale, hr_up, hr_steps,
                      hr_strength, hr_box, tabs, mode])
    return demo


def to_unit(values) -> Unit:
    """A unit's widget values (:func:`unit_block`'s order) -> :class:`.run.Unit`."""
    base, slots = values[:UNIT_FIELDS], values[UNIT_FIELDS:]
    sliders, checks = slots[:units.SLIDERS], slots[units.SLIDERS:units.SLIDERS + units.CHECKS]
    params = units.annotator_values(base[2], sliders, checks, slots[units.SLIDERS + units.CHECKS:])
    return Unit(*base, params=params)


def unit_block(gr, i: int, backend, nets: list[str], size: int, brush, width, height) -> list:
    """One ControlNet unit's accordion; its input widgets in :class:`.run.Unit`'s order, then its
    generic preprocessor widgets (sliders, checkboxes, dropdown)."""
    with gr.Accordion(f"ControlNet Unit {i}", open=i == 0, elem_id=f"unit{i}") as accordion:
        with gr.Row():
            enabled = gr.Checkbox(label="Enable", value=False, elem_id=f"unit{i}-enable")
            pixel = gr.Checkbox(label="Pixel Perfect", value=True,
                                info="Preprocessor Resolution from the image and Width / Height")
        with gr.Row():
            image = gr.ImageMask(label="Image", type="numpy", brush=brush, elem_id=f"unit{i}-image")
            condition = gr.Image(label="Preprocessor preview", interactive=False)
        gr.Markdown(IMAGE_INFO)
        ctype = gr.Radio(units.control_types(nets), value=units.ALL, label="Control Type", elem_id=f"unit{i}-type")
        with gr.Row():
            pre = gr.Dropdown(units.preprocessor_choices(), value="none", label="Preprocessor", info=PREPROCESSOR_INFO)
            model = gr.Dropdown(nets, value=None, label="Model")
        with gr.Row():
            weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Control Weight")
            start = gr.Slider(0, 1, value=0.0, step=0.01, label="Starting Control Step")
            end = gr.Slider(0, 1, value=1.0, step=0.01, label="Ending Control Step")
        with gr.Row():
            res = gr.Slider(8, 2048, value=size, step=1, label="Preprocessor Resolution", interactive=False)
            resize = gr.Radio([r.webui for r in RESIZE_TABLE], value=DEFAULT_RESIZE, label="Resize Mode")
        with gr.Row():
            sliders = [gr.Slider(0, 1, visible=False, label=f"Parameter {k}") for k in range(units.SLIDERS)]
            checks = [gr.Checkbox(visible=False, label=f"Flag {k}") for k in range(units.CHECKS)]
            choices = [gr.Dropdown(["-"], value="-", visible=False, label=f"Choice {k}") for k in range(units.CHOICES)]
        slots = [*sliders, *checks, *choices]
        preview_button = gr.Button("Preview")

    def resolution(value, pp, mode, w, h):
        image, _ = split_mask(value)
        if not pp or image is None:
            return gr.update(interactive=not pp)
        return gr.update(value=units.pixel_perfect(image.size, w, h, mode), interactive=False)

    def on_preview(value, p, pp, r, mode, w, h, *slot_values):
        image, _ = split_mask(value)
        r = units.pixel_perfect(image.size, w, h, mode) if pp and image is not None else r
        params = units.annotator_values(p, slot_values[:units.SLIDERS],
                                        slot_values[units.SLIDERS:units.SLIDERS + units.CHECKS],
                                        slot_values[units.SLIDERS + units.CHECKS:])
        return preview(value, p, r, params), r

    def on_type(label):
        p, m, pres, models = units.control_type_pair(label, units.controlnet_names(backend))
        return (gr.update(choices=units.preprocessor_choices(pres), value=p),
                gr.update(choices=models, value=m))

    image.upload(lambda: True, None, enabled)  # sd-webui-controlnet: an uploaded image enables its unit
    for trigger in (image.upload, pixel.change, resize.change):
        trigger(resolution, [image, pixel, resize, width, height], res)
    ctype.change(safe(on_type), ctype, [pre, model])
    pre.change(units.slot_updates, pre, slots)
    model.change(lambda name: units.recommended_window(units.current_base(backend), name), model, [start, end])
    for trigger in (enabled.change, pre.change, model.change):
        trigger(lambda on, p, m: gr.update(label=units.unit_header(i, on, p, m)), [enabled, pre, model], accordion)
    preview_button.click(safe(on_preview), [image, pre, pixel, res, resize, width, height, *slots], [condition, res])
    return [enabled, image, pre, model, weight, start, end, resize, pixel, res, *slots]


def show_png_info(path):
    """PNG Info: the dropped image's parameters text and fields (cleared with the image)."""
    if path is None:
        return "", {}
    text, fields = pnginfo.read_info(path)
    return text, fields


def send_to_txt2img(gr, fields: dict, samplers: list[str]):
    """Send to txt2img: the parsed values into the txt2img widgets (the rest kept; the Hires. fix
    set and shown where the image had one, else turned off), that tab shown."""
    if not fields:
        raise gr.Error("drop a PNG with parameters on PNG Info first")
    v = {"hires": False, **pnginfo.txt2img_values(fields, samplers)}
    keys = ("prompt", "negative", "steps", "sampler", "cfg", "seed", "width", "height", "hires", "hires_scale",
            "hires_upscaler", "hires_steps", "hires_strength")
    return (*(v[k] if k in v else gr.update() for k in keys), gr.Accordion(open=v["hires"]),
            gr.Tabs(selected="txt2img"), "txt2img")


def safe(fn):
    """User errors as gradio's one-line error toast, not a traceback."""
    def wrapped(*args, **kwargs):
        import gradio as gr  # local: heavy, only this path needs it

        try:
            return fn(*args, **kwargs)
        except ControlstackError as exc:
            raise gr.Error(str(exc)) from None
    return wrapped
