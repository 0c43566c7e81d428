"""The web UI (gradio, mounted at ``/`` by ``controlstack serve``): the whole workflow in a browser.

Labels and defaults follow sd-webui-controlnet where it has them ("ControlNet Unit 0",
"Preprocessor", "Control Weight", "Starting Control Step", "Control Mode", ...). Per unit: an
image (draw on it to mask where the control acts), a preprocessor with a preview, a model, a
weight and a window; then prompt and sampling settings, a live progress bar, a gallery with the
parameters, and "send to unit 0" to reuse a result as a condition. Every call goes through the
Python API (:class:`~controlstack.Pipeline`), under the server's one-generation-at-a-time lock.
The functions the widgets call are plain functions (:func:`preview`, :func:`generate`), tested
without a browser.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from controlstack.annotators import LEARNED
from controlstack.errors import ControlstackError
from controlstack.io.png import CONTROL_MODES, SAMPLERS, format_parameters

UNITS = 3
RECOMMENDED = "(model's recommendation)"


def split_mask(value) -> tuple[Image.Image | None, np.ndarray | None]:
    """A gradio ImageMask value -> (the image, the drawn mask or None: draw = where the control acts)."""
    if value is None:
        return None, None
    if isinstance(value, dict):
        background = value.get("background")
        layers = [layer for layer in value.get("layers") or [] if layer is not None]
        image = Image.fromarray(np.asarray(background)).convert("RGB") if background is not None else None
        mask = None
        for layer in layers:
            a = np.asarray(layer)
            drawn = a[..., 3] > 0 if a.ndim == 3 and a.shape[2] == 4 else a.max(-1) > 0 if a.ndim == 3 else a > 0
            mask = drawn if mask is None else mask | drawn
        return image, (mask.astype(np.float32) if mask is not None and mask.any() else None)
    return Image.fromarray(np.asarray(value)).convert("RGB"), None


def preview(unit_image, preprocessor: str, resolution: int = 512):
    """The condition a preprocessor makes from a unit's image (what the unit will use)."""
    from controlstack import annotators

    image, _ = split_mask(unit_image)
    if image is None:
        raise ControlstackError("upload an image to the unit first")
    if preprocessor in (None, "", "none"):
        return image
    return annotators.get(preprocessor, resolution=int(resolution))(image)


def generate(pipe, lock, prompt, negative, sampler, steps, cfg, seed, width, height, batch, control_mode, units,
             progress=None):
    """Run one generation from the widgets' values; ``units``: (enabled, image, preprocessor, model,
    weight, start, end) per unit. Returns (images, parameters text)."""
    from controlstack import Control

    controls = []
    for i, (enabled, value, pre, model, weight, start, end) in enumerate(units):
        if not enabled:
            continue
        image, mask = split_mask(value)
        if image is None:
            raise ControlstackError(f"ControlNet Unit {i} is enabled but has no image")
        if not model:
            raise ControlstackError(f"ControlNet Unit {i}: choose a model")
        controls.append(Control(model, image, weight=float(weight), start=float(start), end=float(end), mask=mask,
                                preprocess=pre if pre and pre != "none" else False))
    mode = None if control_mode == RECOMMENDED else {v: k for k, v in CONTROL_MODES.items()}[control_mode]
    callback = (lambda done, total: progress(done / total, desc=f"step {done}/{total}")) if progress else None
    with lock:
        seed = random.randrange(2**32) if int(seed) < 0 else int(seed)  # recorded, so the image can be made again
        result = pipe(prompt, controls, steps=int(steps), cfg=float(cfg), seed=seed,
                      width=int(width), height=int(height), batch=int(batch),
                      scheduler={v: k for k, v in SAMPLERS.items()}[sampler], mode=mode, negative_prompt=negative,
                      progress=False, return_result=True, step_callback=callback)
    return result.images, format_parameters(result.parameters)


PREPROCESSOR_INFO = (f"learned ones ({', '.join(LEARNED)}) are trained on the procedural world: reliable on its "
                     "scenes, not on photographs; on a photo use canny, softedge, lineart, lines or scribble "
                     "(controlstack annotate --list says more)")


def recommended_window(pipe, model: str | None) -> tuple[float, float]:
    """The start / end a unit's sliders take when its model is chosen: the ControlNet's recommended
    window, else the base's, else 0 / 1 -- what the API gives a control that leaves them unset."""
    from controlstack.io.settings import controlnet_recommendation

    rec = {k: pipe.recommended[k] for k in ("start", "end") if k in pipe.recommended}
    rec.update({k: v for k, v in controlnet_recommendation(pipe.folder_of(model)).items()
                if k in ("start", "end")} if model else {})
    return float(rec.get("start", 0.0)), float(rec.get("end", 1.0))


def preprocessor_choices() -> list[tuple[str, str]]:
    """(label, annotator name) for the Preprocessor dropdown: a learned one's label says it is for
    world scenes (its one-line note, with what to use on photos, is in ``annotate --list``)."""
    from controlstack import annotators

    return [("none", "none")] + [(f"{n} (learned: world scenes, not photos)" if n in annotators.LEARNED else n, n)
                                 for n in annotators.available()]


def build(pipe, lock):
    """The gradio Blocks over ``pipe``."""
    import gradio as gr

    size = pipe.native_size
    with gr.Blocks(title="controlstack") as demo:
        gr.Markdown("# controlstack\nSpatial control for text-to-image diffusion (ControlNet, Minimal Impact, Omni).")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, value="a red cube on grass")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLERS.values()), value="UniPC", label="Sampling method")
                    steps = gr.Slider(1, 150, value=pipe.recommended.get("steps", 20), step=1, label="Sampling steps")
                    cfg = gr.Slider(0, 30, value=pipe.recommended.get("cfg", 7.5), step=0.5, label="CFG Scale")
                with gr.Row():
                    width = gr.Slider(64, 1024, value=size, step=8, label="Width")
                    height = gr.Slider(64, 1024, value=size, step=8, label="Height")
                    batch = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                    seed = gr.Number(value=-1, precision=0, label="Seed")
                mode = gr.Radio([RECOMMENDED, *CONTROL_MODES.values()], value=RECOMMENDED, label="Control Mode")
                unit_widgets = []
                for i in range(UNITS):
                    with gr.Accordion(f"ControlNet Unit {i}", open=i == 0):
                        enabled = gr.Checkbox(label="Enable", value=False)
                        with gr.Row():
                            image = gr.ImageMask(label="Image (draw to mask where the control acts)", type="numpy")
                            condition = gr.Image(label="Preprocessor preview", interactive=False)
                        with gr.Row():
                            pre = gr.Dropdown(preprocessor_choices(), value="none", label="Preprocessor",
                                              info=PREPROCESSOR_INFO)
                            model = gr.Dropdown(sorted(pipe.controlnets), value=None, label="Model")
                            res = gr.Slider(64, 1024, value=size, step=8, label="Preprocessor Resolution")
                        with gr.Row():
                            weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Control Weight")
                            start = gr.Slider(0, 1, value=0.0, step=0.01, label="Starting Control Step")
                            end = gr.Slider(0, 1, value=1.0, step=0.01, label="Ending Control Step")
                        gr.Button("Preview").click(_safe(preview), [image, pre, res], condition)
                        model.change(lambda name: recommended_window(pipe, name), model, [start, end])
                        unit_widgets.append((enabled, image, pre, model, weight, start, end))
            with gr.Column(scale=2):
                run = gr.Button("Generate", variant="primary")
                gallery = gr.Gallery(label="Output", columns=2)
                info = gr.Textbox(label="Parameters", lines=6)
                send = gr.Button("Send to ControlNet Unit 0")
        flat = [w for unit in unit_widgets for w in unit]

        def on_generate(*values, progress=gr.Progress()):
            head, rest = values[:10], values[10:]
            units = [rest[i:i + 7] for i in range(0, len(rest), 7)]
            return _safe(generate)(pipe, lock, *head, units, progress=progress)

        run.click(on_generate, [prompt, negative, sampler, steps, cfg, seed, width, height, batch, mode, *flat],
                  [gallery, info])
        send.click(lambda g: (g[0][0] if g else None), gallery, unit_widgets[0][1])
    return demo


def _safe(fn):
    """User errors as gradio's one-line error toast, not a traceback."""
    def wrapped(*args, **kwargs):
        import gradio as gr

        try:
            return fn(*args, **kwargs)
        except ControlstackError as exc:
            raise gr.Error(str(exc)) from None
    return wrapped
