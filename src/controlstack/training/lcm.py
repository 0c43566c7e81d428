"""Recipe: latent consistency distillation of a base into a few-step student (LCM, LCM-LoRA).

Luo et al., 2023, "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step
Inference", Algorithm 1 (LCD), as diffusers' ``train_lcm_distill_sd_wds.py`` (full student) and
``train_lcm_distill_lora_sd_wds.py`` (LCM-LoRA; Luo et al., 2023b) run it. Per batch:

1. a timestep ``t_{n+k}`` from the teacher's schedule thinned to ``num_ddim_timesteps`` (k = 1000 /
   50 = 20), ``z_{n+k}`` the latents noised to it, a guidance ``w ~ U[w_min, w_max]``;
2. the student's consistency output ``f(z, t) = c_skip(t) z + c_out(t) x̂_0(z, t)`` at ``t_{n+k}``,
   with the boundary condition ``c_skip(0) = 1, c_out(0) = 0`` (Eq. 5; ``timestep_scaling`` 10 as
   diffusers' ``LCMScheduler``, so ``c_skip`` falls to ~0 within the first steps);
3. one *augmented* DDIM step of the frozen teacher from ``t_{n+k}`` to ``t_n``: its x̂_0 and ε̂
   guided by ``w`` (Eq. 9: ``cond + w (cond - uncond)``, the empty prompt as the negative);
4. the target ``f⁻(z_n, t_n)`` of the target network -- an EMA of the student (decay
   ``ema_decay``, Alg. 1 line 8) for a full student, the student itself without gradients for a LoRA
   student, as diffusers does;
5. the pseudo-Huber loss ``sqrt((f - f⁻)² + c²) - c`` (the LCM scripts' ``huber_c``).

**Control-aware distillation** (``controls`` / ``controlnets``): with probability
``control_probability`` a batch is distilled under one of the teacher's own ControlNets (drawn
uniformly, frozen, weight 1, the whole window): the teacher's guided step, the target and the student
all receive that ControlNet's residuals for the batch's condition images. The student then learns the
consistency map of the *controlled* probability-flow ODE, so the unchanged ControlNets keep their
structure on it; distilled on text alone, the student's blocks drift from the features the
ControlNets were trained to add to (docs/speed.md measures both).

A **full** student is the teacher's U-Net with a guidance embedding (``time_cond_proj_dim``:
``w`` embedded sinusoidally, ``models/lcm.py``), so one forward pass gives the guided prediction;
its new projection starts at zero, so step 0 is the teacher. A **LoRA** student adds PEFT LoRA
layers to a copy of the teacher (w is not an input: the LoRA learns the guidance ``w`` draws
average to). Teacher, text encoder and VAE are locked. Predictions convert through the teacher's
own parametrisation (ε or v, its scheduler's ``prediction_type``), which the student keeps.

Output: ``<output_dir>/model`` -- a full student: a Stable Diffusion folder (the student U-Net, the
teacher's VAE, text encoder and tokenizer, an ``LCMScheduler`` config, and ``controlstack.json``
recommending the ``lcm`` sampler, 4 steps and the guidance); a LoRA student:
``pytorch_lora_weights.safetensors`` (diffusers' layout; ``--lora`` / ``pipe.load_lora`` read it).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from controlstack.errors import require
from controlstack.io.checkpoints import check_compatible, load_controlnet
from controlstack.io.png import make_grid
from controlstack.io.settings import SETTINGS
from controlstack.models.lcm import guidance_scale_embedding
from controlstack.training.config import TrainConfig
from controlstack.training.controlnet import load_base
from controlstack.training.data import RowTransform, batches, first_rows, load_image_dataset, make_dataloader
from controlstack.training.diffusion import tokenize
from controlstack.training.latents import batch_latents, training_rows
from controlstack.training.session import TrainingSession, make_lr_scheduler, make_optimizer
from controlstack.training.validation import tensor_to_pil, validation_pipeline

STUDENTS = ("full", "lora")
LORA_FILE = "pytorch_lora_weights.safetensors"
#: the layers an LCM-LoRA adapts (diffusers' LCM-LoRA script: attention, feed-forward, resnets, samplers)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class LCMConfig(TrainConfig):
    teacher: str = ""                  # the base to distil: a Stable Diffusion folder (the bundle) or single file
    latent_cache: str = ""             # file of the VAE's posterior per row (latents.py); "": encode every step
    student: str = "full"              # full: guidance-embedded U-Net | lora: LCM-LoRA on the teacher
    num_ddim_timesteps: int = 50       # the solver's schedule: skipping step k = 1000 / 50 = 20
    w_min: float = 3.0                 # guidance drawn per sample (CFG scale = w + 1)
    w_max: float = 9.0
    ema_decay: float = 0.95            # the target network (full student; LCM's mu)
    huber_c: float = 0.001
    timestep_scaling: float = 10.0     # the boundary scalings' time scale (LCMScheduler's)
    time_cond_proj_dim: int = 256      # full student: the guidance embedding's width
    lora_rank: int = 64
    lora_alpha: int = 64
    controls: tuple[str, ...] = ()     # dataset condition columns distilled under the teacher's ControlNets
    controlnets: tuple[str, ...] = ()  # ... one ControlNet folder (trained on the teacher) per control
    control_probability: float = 0.75  # chance a batch is distilled under one of them (else text alone)
    num_inference_steps: int = 4       # validation samples, and the exported recommendation
    guidance_scale: float = 7.0        # ... their CFG (w + 1)
    output_dir: str = "outputs/train/lcm"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.teacher != "", "config key 'teacher' is missing; set it to the base model folder to distil")
        require(self.student in STUDENTS, f"config key 'student' is '{self.student}'; choose one of {', '.join(STUDENTS)}")
        require(1 <= self.num_ddim_timesteps <= 1000 and 1000 % self.num_ddim_timesteps == 0,
                "config key 'num_ddim_timesteps' must divide the teacher's 1000 timesteps (e.g. 50: k = 20)")
        require(0.0 <= self.w_min <= self.w_max, "config keys 'w_min' <= 'w_max' (both >= 0)")
        require(0.0 < self.ema_decay < 1.0, "config key 'ema_decay' must be in (0, 1)")
        require(self.huber_c > 0 and self.timestep_scaling > 0, "config keys 'huber_c' and 'timestep_scaling' must be > 0")
        require(self.time_cond_proj_dim >= 2 and self.lora_rank >= 1 and self.num_inference_steps >= 1,
                "config keys 'time_cond_proj_dim' (>= 2), 'lora_rank' and 'num_inference_steps' (>= 1)")
        require(len(self.controls) == len(self.controlnets),
                f"config keys 'controls' ({len(self.controls)}) and 'controlnets' ({len(self.controlnets)}) "
                "need one ControlNet folder per condition column")
        require(0.0 <= self.control_probability <= 1.0, "config key 'control_probability' must be in [0, 1]")
        require(not set(self.controls) & {"image", "text"}, "config key 'controls' names dataset condition columns, "
                                                            "not 'image' or 'text'")


# -- the consistency parametrisation and the solver ----------------------------------------------------
def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """``(c_skip, c_out)`` at integer timesteps ``t`` (LCM Eq. 5, diffusers' LCMScheduler): 1 and 0 at
    ``t = 0``, so ``f(z, 0) = z``."""
    s = timestep_scaling * t.float()
    return sigma_data**2 / (s**2 + sigma_data**2), s / (s**2 + sigma_data**2) ** 0.5


def x0_and_noise(output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, prediction_type: str, alphas_cumprod):
    """``(x̂_0, ε̂)`` from a U-Net output of ``prediction_type`` at timesteps ``t`` (per sample)."""
    a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1).to(sample)
    s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1).to(sample)
    if prediction_type == "v_prediction":
        return a * sample - s * output, a * output + s * sample
    return (sample - s * output) / a, output


class DDIMSolver:
    """The teacher's schedule thinned to ``n`` timesteps (``k = 1000 / n`` apart: 19, 39, ..., 999 for
    n = 50) and one deterministic DDIM step down it (diffusers' LCM scripts' ``DDIMSolver``)."""

    def __init__(self, alphas_cumprod: torch.Tensor, n: int):
        k = len(alphas_cumprod) // n
        self.timesteps = torch.from_numpy((np.arange(1, n + 1) * k).round().astype(np.int64) - 1)
        self.k = k
        prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])
        self.alphas_prev = prev

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``z_{t_n} = sqrt(ᾱ_{t_n}) x̂_0 + sqrt(1 - ᾱ_{t_n}) ε̂`` from the solver's index ``n + 1``."""
        a = self.alphas_prev[index].view(-1, 1, 1, 1).to(x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps


def teacher_schedule(config: dict):
    """The teacher's own noise schedule (its scheduler config's betas), as a ``DDPMScheduler``."""
    from diffusers import DDPMScheduler  # local: heavy, only this path needs it

    return DDPMScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    return (torch.sqrt((a.float() - b.float()) ** 2 + c**2) - c).mean()


# -- the student -------------------------------------------------------------------------------------
def build_student(teacher, config: LCMConfig):
    """A full student (the teacher with a zero-initialised guidance embedding) or a LoRA student."""
    from diffusers import UNet2DConditionModel  # local: heavy, only this path needs it

    if config.student == "lora":
        from peft import LoraConfig  # local: heavy, only this path needs it

        student = copy.deepcopy(teacher)
        student.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=LORA_TARGETS,
                                       init_lora_weights="gaussian"))
        return student.train()
    cfg = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel(**{**cfg, "time_cond_proj_dim": config.time_cond_proj_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("time_embedding.cond_proj") for k in missing), missing
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)  # step 0 is the teacher
    return student.requires_grad_(True).train()


class Student(torch.nn.Module):
    """The trained U-Net behind one forward (``w`` embedded for a full student), so DDP sees it whole."""

    def __init__(self, unet, embed: bool):
        super().__init__()
        self.unet, self.embed = unet, embed

    def forward(self, z, t, text, w, control: dict | None = None) -> torch.Tensor:
        cond = guidance_scale_embedding(w, self.unet.config.time_cond_proj_dim).to(z) if self.embed else None
        return self.unet(z, t, text, timestep_cond=cond, **(control or {})).sample


def load_controlnets(config: LCMConfig, teacher, device) -> list:
    """The teacher's ControlNets, frozen, each checked against it."""
    nets = []
    for path in config.controlnets:
        net = load_controlnet(path)
        check_compatible(net, teacher)
        nets.append(net.to(device).eval().requires_grad_(False))
    return nets


def control_residuals(controlnet, z, t, text, hint) -> dict:
    """A ControlNet's residuals (weight 1) as the U-Net's keyword arguments; None: no control."""
    if controlnet is None:
        return {}
    down, mid = controlnet(z, t, encoder_hidden_states=text, controlnet_cond=hint.to(z), return_dict=False)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def pick_control(config: LCMConfig, nets: list, g: torch.Generator) -> int | None:
    """The batch's ControlNet index (drawn from the step's generator, so resume repeats it), or None."""
    if not nets:
        return None
    use, which = torch.rand(1, generator=g).item(), int(torch.randint(len(nets), (1,), generator=g))
    return which if use < config.control_probability else None


def train(config: LCMConfig, resume: bool = False) -> Path:
    """Distil and export the student; returns the output ``model`` folder."""
    session = TrainingSession(config, "lcm", resume)
    acc = session.accelerator
    columns = {config.image_column: "image", config.caption_column: "text", **{c: c for c in config.controls}}
    dataset = load_image_dataset(config.data, columns)
    val_set = load_image_dataset(config.validation_data, columns) if config.validation_data else dataset
    base = load_base(config.teacher)
    vae, text_encoder, teacher = base.vae.to(acc.device), base.text_encoder.to(acc.device), base.unet.to(acc.device)
    prediction = base.scheduler_config.get("prediction_type", "epsilon")
    alphas = teacher_schedule(base.scheduler_config).alphas_cumprod.to(acc.device)
    solver = DDIMSolver(alphas, config.num_ddim_timesteps)
    nets = load_controlnets(config, teacher, acc.device)
    full = config.student == "full"
    model = Student(build_student(teacher, config).to(acc.device), embed=full)
    target = copy.deepcopy(model).requires_grad_(False).eval() if full else None  # the EMA target network
    if target is not None:
        acc.register_for_checkpointing(target)

    cache, dataset, transform = training_rows(config.latent_cache, acc, vae, dataset, config.resolution,
                                                hints=tuple(config.controls))
    loader = make_dataloader(dataset, transform, config.batch_size, config.num_workers)
    val = first_rows(val_set, config.num_validation_images, RowTransform(config.resolution, targets=("image",), caption="text"))
    with torch.no_grad():
        empty = text_encoder(tokenize(base.tokenizer, [""], acc.device))[0]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    lr_scheduler = make_lr_scheduler(optimizer, config, acc.num_processes)
    model, optimizer, loader, lr_scheduler = acc.prepare(model, optimizer, loader, lr_scheduler)
    session.restore()

    bar = session.progress()
    for batch in batches(acc, loader, session.micro) if not session.done else ():
        g = session.step_generator()
        latents = batch_latents(vae, batch, g, acc.device, cache)
        n = len(latents)
        index = torch.randint(0, config.num_ddim_timesteps, (n,), generator=g).to(acc.device)
        start = solver.timesteps.to(acc.device)[index]               # t_{n+k}
        end = (start - solver.k).clamp(min=0)                         # t_n
        noise = torch.randn(latents.shape, generator=g).to(latents)
        a = alphas[start].view(-1, 1, 1, 1)
        z = a.sqrt() * latents + (1 - a).sqrt() * noise
        w = (config.w_max - config.w_min) * torch.rand(n, generator=g).to(acc.device) + config.w_min
        which = pick_control(config, nets, session.step_generator(stream=1))  # its own stream: same noise
        net, hint = (None, None) if which is None else (nets[which], batch[config.controls[which]])
        with torch.no_grad():
            text = text_encoder(tokenize(base.tokenizer, batch["text"], acc.device))[0]
            # the teacher's guided DDIM step t_{n+k} -> t_n (Eq. 9); a ControlNet acts on both halves
            zz, tt, texts = torch.cat([z, z]), torch.cat([start, start]), torch.cat([text, empty.expand_as(text)])
            out = teacher(zz, tt, texts, **control_residuals(net, zz, tt, texts, None if hint is None else
                                                               torch.cat([hint, hint]))).sample
            (x0_c, e_c), (x0_u, e_u) = (x0_and_noise(o, start, z, prediction, alphas) for o in out.chunk(2))
            ww = w.view(-1, 1, 1, 1)
            z_prev = solver.step(x0_c + ww * (x0_c - x0_u), e_c + ww * (e_c - e_u), index)
            # the target f-(z_n, t_n)
            tgt_net = target if target is not None else model
            tgt_control = control_residuals(net, z_prev, end, text, hint)
            tgt_x0, _ = x0_and_noise(tgt_net(z_prev, end, text, w, tgt_control), end, z_prev, prediction, alphas)
            control = control_residuals(net, z, start, text, hint)  # the student's: the ControlNet is frozen
            c_skip, c_out = (c.view(-1, 1, 1, 1) for c in boundary_scalings(end, config.timestep_scaling))
            goal = c_skip * z_prev + c_out * tgt_x0
        c_skip, c_out = (c.view(-1, 1, 1, 1) for c in boundary_scalings(start, config.timestep_scaling))
        with acc.accumulate(model), acc.autocast():
            pred_x0, _ = x0_and_noise(model(z, start, text, w, control), start, z, prediction, alphas)
            loss = pseudo_huber(c_skip * z + c_out * pred_x0, goal, config.huber_c)
            session.optimize(model, loss, optimizer, lr_scheduler)
        if not acc.sync_gradients:
            continue
        if target is not None:  # Alg. 1 line 8: theta- <- stopgrad(mu theta- + (1 - mu) theta)
            with torch.no_grad():
                for t_p, s_p in zip(target.parameters(), acc.unwrap_model(model).parameters()):
                    t_p.lerp_(s_p, 1.0 - config.ema_decay)
        session.end_step(bar, lr_scheduler)
        if session.should_validate() and session.is_main:
            validate(session, acc.unwrap_model(model).unet, base, val)
        if session.done:
            break
    bar.close()
    student = acc.unwrap_model(model).unet.eval()
    return session.export(lambda d: export(d, student, base, config))


def export(folder: Path, student, base, config: LCMConfig) -> None:
    """A full student: a Stable Diffusion folder sampled by the ``lcm`` sampler; a LoRA: its file."""
    from diffusers import LCMScheduler, StableDiffusionPipeline  # local: heavy, only this path needs it

    folder = Path(folder)
    if config.student == "lora":
        from peft.utils import get_peft_model_state_dict  # local: heavy, only this path needs it

        # PEFT's own key names (lora_A / lora_B), which diffusers' loaders read for every layer kind
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(student),
                                                  safe_serialization=True)
        return
    # the sampler keeps the run's solver schedule and boundary scalings (LCMScheduler's own defaults otherwise)
    scheduler = LCMScheduler.from_config({k: v for k, v in base.scheduler_config.items() if not k.startswith("_")},
                                         original_inference_steps=config.num_ddim_timesteps,
                                         timestep_scaling=config.timestep_scaling)
    StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=student,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    recommended = {"scheduler": "lcm", "steps": config.num_inference_steps, "cfg": config.guidance_scale}
    if config.controls:  # distilled under its ControlNets over the whole window: their own windows were
        recommended["control_window"] = [0.0, 1.0]  # measured on the teacher's 20-step schedule
    settings = {"recommended": recommended,
                "training": {"recipe": "lcm", "teacher": str(config.teacher), "w": [config.w_min, config.w_max],
                             "num_ddim_timesteps": config.num_ddim_timesteps, "controls": list(config.controls),
                             "control_probability": config.control_probability}}
    (folder / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")


@torch.no_grad()
def validate(session: TrainingSession, unet, base, val: dict) -> None:
    """Grid rows: the student in ``num_inference_steps`` LCM steps | the real images."""
    cfg = session.config
    pipe = validation_pipeline(base.vae, base.text_encoder, base.tokenizer, copy.deepcopy(unet).eval(),
                               base.scheduler_config)
    kw = dict(steps=cfg.num_inference_steps, cfg=cfg.guidance_scale, width=cfg.resolution, height=cfg.resolution,
              scheduler="lcm", progress=False)
    images = [pipe(p, [], seed=cfg.seed + i, **kw)[0] for i, p in enumerate(val["text"])]
    make_grid(images + tensor_to_pil(val["image"], signed=True), cols=len(images)).save(
        session.out / "samples" / f"step-{session.step:07d}.png")
    unet.train()
