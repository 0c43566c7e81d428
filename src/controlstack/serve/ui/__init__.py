"""The web UI (gradio, mounted at ``/`` by ``controlstack serve``): the whole workflow in a browser.

Labels and defaults follow sd-webui and sd-webui-controlnet where they have them. Tabs: txt2img
(with the Hires. fix accordion), img2img / inpaint (init image, Denoising strength, a drawn mask with
Mask blur, Mask mode, Masked content, Inpaint area and padding; pasted back as sd-webui does) and
PNG Info (a dropped image's parameters, "Send to txt2img"). Shared: prompt, sampling settings, Batch
size / Batch count, Control Mode and the ControlNet units -- per unit an image (uploading enables the
unit; drawing on it masks where the control acts), a Control Type that sets a preprocessor + model
pair, the preprocessor's own parameters, Preprocessor Resolution (or Pixel Perfect), Resize Mode, a
preview, weight and window; the accordion header names an active unit ("ControlNet Unit 0 [Canny]").
Generate builds the same :class:`~controlstack.serve.spec.JobSpec` as ``/v1/generate`` and submits it
to the server's one job queue (bounded, time-limited, cancellable, stored), shows its steps live,
saves the PNGs (parameters included) to an outputs folder and shows those; Interrupt and Skip act on
the running job as sd-webui's buttons do.

One UI for both server shapes: the widgets talk to a *backend*, implemented by the embedded server's
:class:`~controlstack.serve.jobs.Jobs` and by a broker front's :class:`~controlstack.serve.distributed.Cluster`:

- ``ui_base()`` -> ``(name, base)``: the base the widgets offer (``name`` goes in the JobSpec; None:
  the server's default) and an object with its ``controlnets``, ``native_size``, ``recommended`` and
  ``folder_of`` (a front's is weightless: ``check_spec`` leaves the rest to the worker);
- ``submit(spec, priority=1)`` -> job id (raises ``Busy`` when the queue is full);
- ``wait(job_id, report)`` -> the finished record with its base64 PNGs, calling ``report(done, total)``
  while it runs;
- ``interrupt()`` / ``skip()`` -> the job ids reached.

Preview runs the annotator in the UI's own process (a front too: annotators need no diffusion model).
The functions the widgets call are plain functions (:mod:`.run`, :mod:`.units`, :mod:`.pnginfo`),
tested without a browser; :mod:`.layout` holds the widgets.
"""

from controlstack.serve.ui.layout import build, default_outputs
from controlstack.serve.ui.run import (
    RECOMMENDED,
    Hires,
    Img2img,
    Unit,
    generate,
    job_control,
    job_spec,
    preview,
    save_outputs,
    split_mask,
)
from controlstack.serve.ui.units import preprocessor_choices, recommended_window

__all__ = [
    "RECOMMENDED",
    "Hires",
    "Img2img",
    "Unit",
    "build",
    "default_outputs",
    "generate",
    "job_control",
    "job_spec",
    "preprocessor_choices",
    "preview",
    "recommended_window",
    "save_outputs",
    "split_mask",
]
