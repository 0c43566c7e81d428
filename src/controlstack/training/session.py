"""What every recipe shares around its loss: accelerator, checkpoints, exact resume, metrics, bars.

Exact resume (a run killed with SIGKILL and resumed ends with the same weights, bit for bit):

* **state** -- ``accelerator.save_state`` writes model(s), optimiser, LR scheduler, registered
  objects (EMA) and RNG states; our ``trainer_state.json`` adds the optimiser step and the number
  of micro-batches consumed (the data position).
* **atomic checkpoints** -- state goes to ``checkpoints/.tmp-step-N`` and is renamed to
  ``step-N`` only when complete, so a kill during a save leaves the previous checkpoint intact.
* **data position** -- see ``data.batches`` (seedable sampler + ``skip_first_batches``).
* **per-step randomness** -- noise, timesteps, caption dropout and posterior samples come from a
  generator seeded by (seed, micro-batch index, process index), so no random stream has to be
  carried across the restart and no other code (validation, logging) can perturb it.
* **metrics** -- rows logged after the checkpoint by the killed run are dropped on resume.

``CONTROLSTACK_TRAIN_STEP_DELAY`` (seconds, float) sleeps after every optimiser step; the
kill-and-resume test uses it to be sure it kills the run mid-way. Nothing else reads it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from controlstack.errors import ControlstackError
from controlstack.training.config import TrainConfig
from controlstack.training.precision import resolve_mixed_precision

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"


class MetricsLog:
    """``metrics.csv`` in long format (step, metric, value): one file for every recipe's metrics."""

    HEADER = ("step", "metric", "value")

    def __init__(self, path: Path, keep_until: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        rows = []
        if keep_until is not None and path.exists():  # resume: drop what the killed run logged later
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.HEADER)
            w.writerows([[r["step"], r["metric"], r["value"]] for r in rows])

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            for k, v in values.items():
                w.writerow([step, k, f"{float(v):.6g}"])


def read_metric(path: Path, metric: str) -> tuple[list[int], list[float]]:
    with Path(path).open() as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == metric]
    return [int(r["step"]) for r in rows], [float(r["value"]) for r in rows]


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (the ControlNet paper's optimiser; also diffusers' training scripts'), fused.

    The fused kernel updates every parameter in one pass. PyTorch's default path on the CPU loops
    over the parameters one by one: for the bundle's U-Net (496 tensors, 6.2M numbers) one step
    took 52.5 ms that way, 38.1 with ``foreach`` and 10.5 fused (the ControlNet: 32.3 / 21.7 /
    7.0 ms; AMD EPYC, 2 cores, session 11), about 5% of a training step. CUDA has the same
    kernel. Devices without one fall back to the default path.
    """
    kwargs = {"lr": config.learning_rate, "betas": (config.adam_beta1, config.adam_beta2),
              "weight_decay": config.adam_weight_decay, "eps": config.adam_epsilon}
    params = list(params)
    if params and isinstance(params[0], dict):  # parameter groups (e.g. Omni's task tokens: own lr)
        trainable = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        trainable = [p for p in params if p.requires_grad]
    try:
        return torch.optim.AdamW(trainable, fused=True, **kwargs)
    except RuntimeError:  # a device or dtype with no fused kernel (e.g. MPS with float64)
        return torch.optim.AdamW(trainable, **kwargs)


def make_lr_scheduler(optimizer, config: TrainConfig, num_processes: int):
    from diffusers.optimization import get_scheduler  # local: heavy, only this path needs it

    # accelerate steps a prepared scheduler once per process per optimiser step (diffusers' scripts
    # multiply by num_processes for the same reason), so the schedule is in those units.
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=config.max_steps * num_processes,
    )


class TrainingSession:
    """Accelerator + output folder + checkpoint/resume + metrics + progress bar for one run."""

    def __init__(self, config: TrainConfig, recipe: str, resume: bool = False):
        from accelerate import Accelerator  # local: heavy, only this path needs it
        from accelerate.utils import (  # local: heavy, only this path needs it
            DataLoaderConfiguration,
            GradientAccumulationPlugin,
            ProjectConfiguration,
        )

        self.config, self.recipe = config, recipe
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / CHECKPOINTS
        existing = self._checkpoints()
        if not resume and (existing or (self.out / MODEL_DIR).exists()):
            raise ControlstackError(
                f"output folder '{self.out}' already holds a run; pass --resume to continue it "
                "or choose another --output"
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.mixed_precision = resolve_mixed_precision(config.mixed_precision, device)
        self.accelerator = Accelerator(
            mixed_precision=self.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config.gradient_accumulation_steps,
                sync_with_dataloader=False,  # an optimiser step is exactly k micro-batches, epochs or not
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
            project_config=ProjectConfiguration(project_dir=str(self.out)),
        )
        from accelerate.utils import set_seed  # local: heavy, only this path needs it

        set_seed(config.seed)  # model initialisation; per-step randomness uses step_generator
        self.resume_from = existing[-1] if (resume and existing) else None
        self.step, self.micro = 0, 0
        self.metrics: MetricsLog | None = None
        self._delay = float(os.environ.get("CONTROLSTACK_TRAIN_STEP_DELAY", "0") or 0)
        self._t0 = time.perf_counter()
        self._images = 0
        self._losses: list[float] = []  # micro-batch losses of the optimiser step in progress
        self._extra: dict[str, list[float]] = {}  # further per-micro-batch metrics (log_extra)

    # -- helpers --------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        return sorted(p for p in self.ckpt_dir.iterdir() if p.name.startswith("step-") and p.is_dir())

    def step_generator(self, micro: int | None = None, stream: int = 0) -> torch.Generator:
        """A CPU generator for micro-batch ``micro`` (default: the current one) of this process;
        ``stream`` > 0 gives independent streams for optional draws (data rebalancing, probes), so
        turning an option on does not change the noise the other draws give."""
        micro = self.micro if micro is None else micro
        entropy = [self.config.seed, micro, self.accelerator.process_index] + ([stream] if stream else [])
        seq = np.random.SeedSequence(entropy)
        return torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> 1))

    # -- resume / checkpoint -------------------------------------------------------------------

    def restore(self) -> None:
        """Load the latest checkpoint if resuming (call after ``accelerator.prepare``).

        The output folder is created here, after the recipe has loaded its data and models, so a
        user error found while loading them leaves nothing behind.
        """
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "samples").mkdir(exist_ok=True)
            self.config.to_yaml(self.out / "config.yaml")
        if self.resume_from is not None:
            self.accelerator.load_state(str(self.resume_from))
            state = json.loads((self.resume_from / STATE_FILE).read_text())
            self.step, self.micro = int(state["step"]), int(state["micro_batches"])
        self.metrics = MetricsLog(self.out / "metrics.csv", self.step if self.resume_from else None, self.is_main)
        self.accelerator.wait_for_everyone()
        self._t0 = time.perf_counter()  # images/s counts training only, not start-up

    def save(self) -> Path:
        final = self.ckpt_dir / f"step-{self.step:07d}"
        tmp = self.ckpt_dir / f".tmp-step-{self.step:07d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {"step": self.step, "micro_batches": self.micro, "recipe": self.recipe}
            (tmp / STATE_FILE).write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: a checkpoint either exists whole or not at all
            for old in self._checkpoints()[: -self.config.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def export(self, write) -> Path:
        """Final weights: ``write(folder)`` into a temporary folder, renamed to ``model/`` when done."""
        self.accelerator.wait_for_everyone()
        final = self.out / MODEL_DIR
        if self.is_main:
            tmp = self.out / ".tmp-model"
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.accelerator.wait_for_everyone()
        return final

    # -- the loop's bookkeeping ----------------------------------------------------------------

    def progress(self):
        return tqdm(
            total=self.config.max_steps, initial=self.step, desc=f"train {self.recipe}",
            unit="step", disable=not self.is_main, dynamic_ncols=True,
        )

    def optimize(self, model, loss: torch.Tensor, optimizer, lr_scheduler) -> None:
        """Backward one micro-batch (call inside ``accelerator.accumulate``); accelerate turns the
        optimiser / scheduler calls into no-ops until the last micro-batch of an accumulation."""
        acc = self.accelerator
        acc.backward(loss)
        if acc.sync_gradients:
            acc.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.micro += 1
        self._losses.append(loss.item())

    def log_extra(self, **values: float) -> None:
        """Per-micro-batch metrics besides the loss (e.g. MI's Asym); logged as their mean with the loss."""
        for k, v in values.items():
            self._extra.setdefault(k, []).append(float(v))

    def end_step(self, bar, lr_scheduler) -> None:
        """After an optimiser step (and whatever must be in its checkpoint, like the EMA update):
        advance the bar, log the step's mean loss, checkpoint; raises on a non-finite loss."""
        cfg = self.config
        loss, lr = sum(self._losses) / len(self._losses), lr_scheduler.get_last_lr()[0]
        self._losses = []
        self.step += 1
        self._images += cfg.batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes
        if not np.isfinite(loss):
            raise ControlstackError(
                f"loss became {loss} at step {self.step}; lower learning_rate or use mixed_precision: no"
            )
        rate = self._images / max(time.perf_counter() - self._t0, 1e-9)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
        bar.update(1)
        extra = {k: sum(v) / len(v) for k, v in self._extra.items() if v}
        self._extra = {}
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            self.metrics.log(self.step, loss=loss, lr=lr, images_per_s=rate, **extra)
        if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
            self.save()
        if self._delay:
            time.sleep(self._delay)

    def should_validate(self) -> bool:
        return self.config.num_validation_images > 0 and (
            self.step % self.config.validate_every == 0 or self.step == self.config.max_steps
        )

    @property
    def done(self) -> bool:
        return self.step >= self.config.max_steps
