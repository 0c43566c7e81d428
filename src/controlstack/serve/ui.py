"""The web UI (gradio, mounted at ``/`` by ``controlstack serve``): the whole workflow in a browser.

Labels and defaults follow sd-webui-controlnet where it has them ("ControlNet Unit 0",
"Preprocessor", "Control Weight", "Starting Control Step", "Control Mode", ...). Per unit: an
image (draw on it to mask where the control acts), a preprocessor with a preview, a model, a
weight and a window; then prompt and sampling settings, a live progress bar, a gallery with the
parameters, and "send to unit 0" to reuse a result as a condition. Generate builds the same
:class:`~.spec.JobSpec` as ``/v1/generate`` and submits it to the server's one job queue (bounded,
time-limited, cancellable, stored), then shows its progress and result. The functions the widgets
call are plain functions (:func:`preview`, :func:`job_spec`, :func:`generate`), tested without a
browser.

One UI for both server shapes: the widgets talk to a *backend* with three methods, implemented by
the embedded server's :class:`~.jobs.Jobs` (one process, its SQLite queue) and by a broker front's
:class:`~.distributed.Cluster` (Celery workers; the PNGs come back from the result backend):

- ``ui_base()`` -> ``(name, base)``: the base the widgets offer (``name`` goes in the JobSpec; None:
  the server's default) and an object with its ``controlnets``, ``native_size``, ``recommended`` and
  ``folder_of`` (a front's is weightless: :func:`~.spec.check_spec` leaves the rest to the worker);
- ``submit(spec, priority=1)`` -> job id (raises :class:`~.jobs.Busy` when the queue is full);
- ``wait(job_id, report)`` -> the finished record with its base64 PNGs, calling ``report(done, total)``
  while it runs.

Preview runs the annotator in the UI's own process (a front too: annotators need no diffusion model).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from controlstack.annotators import LEARNED
from controlstack.errors import ControlstackError
from controlstack.injection.modes import CONTROL_MODE_TABLE
from controlstack.sampling.schedulers import SAMPLER_BY_LABEL, SAMPLER_TABLE

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


#: the JobSpec field -> the widget's label, for messages
LABELS = {"prompt": "Prompt", "negative_prompt": "Negative prompt", "steps": "Sampling steps", "cfg": "CFG Scale",
          "seed": "Seed", "width": "Width", "height": "Height", "batch": "Batch size", "scheduler": "Sampling method"}


def job_spec(backend, limits, prompt, negative, sampler, steps, cfg, seed, width, height, batch, control_mode, units):
    """The widgets' values -> the validated :class:`~.spec.JobSpec` ``/v1/generate`` would build
    (the same checks, the widgets' labels in messages); ``units``: (enabled, image, preprocessor,
    model, weight, start, end) per unit. The seed is drawn now (-1), so the job records the one used."""
    from controlstack.serve.spec import ControlSpec, JobSpec, check_spec, draw_seed, number, text

    controls, names = [], {}
    for i, (enabled, value, pre, model, weight, start, end) in enumerate(units):
        if not enabled:
            continue
        image, mask = split_mask(value)
        where = f"ControlNet Unit {i}"
        if image is None:
            raise ControlstackError(f"{where} is enabled but has no image")
        if not model:
            raise ControlstackError(f"{where}: choose a model")
        if max(image.size) > limits.max_side * 4:  # the cap decode_image puts on an uploaded image
            raise ControlstackError(f"{where}: the image is {image.size[0]}x{image.size[1]}; at most "
                                    f"{limits.max_side * 4} px a side")
        names[f"controls[{len(controls)}]"] = where
        controls.append(ControlSpec(
            model, image, weight=number(weight, f"{where} Control Weight", -10, 10),
            start=number(start, f"{where} Starting Control Step", 0, 1),
            end=number(end, f"{where} Ending Control Step", 0, 1),
            mask=None if mask is None else Image.fromarray((mask * 255).astype(np.uint8), "L"),
            preprocess=pre if pre and pre != "none" else False))
    if len(controls) > limits.max_controls:
        raise ControlstackError(f"{len(controls)} units enabled; this server takes at most {limits.max_controls}")
    spec = JobSpec(
        prompt=text(prompt or "", "Prompt", limits.max_prompt),
        negative_prompt=text(negative or "", "Negative prompt", limits.max_prompt),
        steps=number(steps, "Sampling steps", 1, limits.max_steps, integer=True),
        cfg=number(cfg, "CFG Scale", 0, 30), seed=draw_seed(int(seed) if seed is not None else -1, "Seed"),
        width=number(width, "Width", 8, limits.max_side, integer=True),
        height=number(height, "Height", 8, limits.max_side, integer=True),
        batch=number(batch, "Batch size", 1, limits.max_batch, integer=True),
        scheduler=SAMPLER_BY_LABEL[sampler], controls=controls,
        mode=None if control_mode == RECOMMENDED else {m.webui: m.name for m in CONTROL_MODE_TABLE}[control_mode])
    name, base = backend.ui_base()
    spec.base = name
    check_spec(spec, base, limits, {**LABELS, **names})
    return spec


def generate(backend, limits, *values, progress=None):
    """Generate button: the widgets' JobSpec (:func:`job_spec`; ``values`` are its arguments after
    ``limits``) as a job of the server's one queue, waited for while ``progress`` shows its steps.
    Returns (images, parameters text). The queue's bound, the time limit, cancelling and
    ``/sdapi/v1/progress`` apply as to ``/v1`` and sd-webui's jobs, and the result is stored."""
    import base64
    import io

    from controlstack.serve.jobs import Busy

    spec = job_spec(backend, limits, *values)
    try:
        job_id = backend.submit(spec, priority=1)  # someone waits at the page: before batch /v1 jobs
    except Busy:
        raise ControlstackError("the queue is full, try again") from None
    report = None
    if progress is not None:
        progress(0.0, desc=f"{job_id} queued")
        report = lambda done, total: progress(done / total if total else 0.0, desc=f"{job_id} step {done}/{total}")
    record = backend.wait(job_id, report)
    if record["status"] != "done":  # the time limit, a cancel (DELETE /v1/jobs/{id}, /sdapi/v1/interrupt), a bug
        raise ControlstackError(f"{job_id}: {record.get('error') or 'the job was ' + record['status']}")
    if progress is not None:
        progress(1.0, desc=f"{job_id} done")
    images = []
    for png in record["images"]:
        with Image.open(io.BytesIO(base64.b64decode(png))) as im:
            im.load()
            images.append(im.copy())
    # the first PNG's infotext: what the job's PNGs carry (sd-webui's "parameters" text)
    return images, f"{job_id}\n{images[0].info.get('parameters', '') if images else ''}"


PREPROCESSOR_INFO = (f"learned ones ({', '.join(LEARNED)}) are trained on the procedural world: reliable on its "
                     "scenes, not on photographs; on a photo use canny, softedge, lineart, lines or scribble "
                     "(controlstack annotate --list says more)")


def recommended_window(pipe, model: str | None) -> tuple[float, float]:
    """The start / end a unit's sliders take when its model is chosen: the ControlNet's recommended
    window, else the base's, else 0 / 1 -- what the API gives a control that leaves them unset."""
    from controlstack.io.settings import controlnet_recommendation

    if pipe is None:  # a front with no worker up yet: the API's own defaults
        return 0.0, 1.0
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


def build(backend, limits):
    """The gradio Blocks over a ``backend`` (module docstring: its base for the widgets, its queue
    for Generate) and ``limits``."""
    import gradio as gr

    try:
        _, pipe = backend.ui_base()
    except ControlstackError:  # a front started before any worker: defaults now, Generate says why
        pipe = None
    size = pipe.native_size if pipe is not None else 512
    recommended = pipe.recommended if pipe is not None else {}
    with gr.Blocks(title="controlstack") as demo:
        gr.Markdown("# controlstack\nSpatial control for text-to-image diffusion (ControlNet, Minimal Impact, Omni).")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, value="a red cube on grass")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    sampler = gr.Dropdown([s.webui for s in SAMPLER_TABLE], value="UniPC", label="Sampling method")
                    steps = gr.Slider(1, 150, value=recommended.get("steps", 20), step=1, label="Sampling steps")
                    cfg = gr.Slider(0, 30, value=recommended.get("cfg", 7.5), step=0.5, label="CFG Scale")
                with gr.Row():
                    width = gr.Slider(64, 1024, value=size, step=8, label="Width")
                    height = gr.Slider(64, 1024, value=size, step=8, label="Height")
                    batch = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                    seed = gr.Number(value=-1, precision=0, label="Seed")
                mode = gr.Radio([RECOMMENDED, *(m.webui for m in CONTROL_MODE_TABLE)], value=RECOMMENDED, label="Control Mode")
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
                            model = gr.Dropdown(controlnet_names(backend), value=None, label="Model")
                            res = gr.Slider(64, 1024, value=size, step=8, label="Preprocessor Resolution")
                        with gr.Row():
                            weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Control Weight")
                            start = gr.Slider(0, 1, value=0.0, step=0.01, label="Starting Control Step")
                            end = gr.Slider(0, 1, value=1.0, step=0.01, label="Ending Control Step")
                        gr.Button("Preview").click(_safe(preview), [image, pre, res], condition)
                        model.change(lambda name: recommended_window(current_base(backend), name), model, [start, end])
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
            return _safe(generate)(backend, limits, *head, units, progress=progress)

        # concurrency_limit=None: every click reaches the server's queue, whose bound answers past it
        # (gradio's own default, one at a time, would hold the others unseen and unbounded)
        run.click(on_generate, [prompt, negative, sampler, steps, cfg, seed, width, height, batch, mode, *flat],
                  [gallery, info], concurrency_limit=None)
        send.click(lambda g: (g[0][0] if g else None), gallery, unit_widgets[0][1])
    return demo


def current_base(backend):
    """The backend's base now, or None (a front whose workers are all gone)."""
    try:
        return backend.ui_base()[1]
    except ControlstackError:
        return None


def controlnet_names(backend) -> list[str]:
    base = current_base(backend)
    return sorted(base.controlnets) if base is not None else []


def _safe(fn):
    """User errors as gradio's one-line error toast, not a traceback."""
    def wrapped(*args, **kwargs):
        import gradio as gr

        try:
            return fn(*args, **kwargs)
        except ControlstackError as exc:
            raise gr.Error(str(exc)) from None
    return wrapped
