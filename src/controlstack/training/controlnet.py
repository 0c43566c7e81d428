"""Recipe: train a ControlNet on the locked base model, as the ControlNet paper does.

Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (ICCV 2023),
Sec. 3: ``y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2)``. The base U-Net ``F(·; Θ)`` is locked;
``ControlNetModel.from_unet`` makes the trainable copy ``Θc`` of its encoder and middle block,
the hint encoder (stride-2 convs down to latent size, ``hint_channels``) and the zero
convolutions ``Z`` (weights and biases 0, so step 0 reproduces the base exactly).
Training (Sec. 3.3-4): ``L = E ||ε - ε_θ(z_t, t, c_t, c_f)||²``, AdamW, 50% of prompts replaced by
"" (the model must learn semantics from the condition), mixed precision, gradient accumulation,
optional EMA of the ControlNet's weights. Hint in [0, 1], target latents from the base's VAE.

The forward pass is the project's own inference path (``models/runner.py`` + ``injection``):
``encode -> ControlNet residuals -> sum injection -> decode`` in :func:`controlnet_eps`.

Minimal Impact ControlNet (MIControlNet, Sec. 4) is options of this recipe, not a copy of it:

* ``rebalance_*`` -- silent-signal data rebalancing (Sec. 4.1, ``rebalance.py``): the condition is
  blanked outside a random subset of the image's regions, the target stays whole;
* ``injection: mi`` -- stage 1, balanced injection in the training forward pass: the very
  strategy object the sampler uses (``injection/mi.py``, options in ``injection_options``);
* ``conservativity_weight`` -- stage 2 (started with ``init_from`` = stage 1's model):
  ``L = L_diffusion + w · Asym(J_cn)`` with Hutchinson probes (``conservativity.py``).

Output: ``<output_dir>/model`` is a diffusers ``ControlNetModel`` folder (safetensors; the EMA
weights when ``use_ema``). ``metrics.csv`` logs the loss and the condition fidelity of validation
samples; ``fidelity.png`` plots it, where the paper's sudden convergence shows as a jump.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from controlstack.errors import require
from controlstack.injection import make_injection
from controlstack.injection.mi import MinimalImpact
from controlstack.io.checkpoints import check_compatible, load_controlnet
from controlstack.io.checkpoints import load_base as load
from controlstack.io.png import make_grid
from controlstack.io.settings import inherited, write_settings
from controlstack.models.runner import ControlNetRunner, UNetRunner
from controlstack.models.task_tokens import (
    TOKENS_FILE,
    add_task_tokens,
    initial_vectors,
    load_task_tokens,
    save_task_tokens,
    swap_in_trainable,
    with_task_token,
)
from controlstack.training import controlnet_transformer
from controlstack.training.config import TrainConfig, list_field
from controlstack.training.conservativity import conservativity_loss, epsilon_part, twice_differentiable
from controlstack.training.data import (
    RowTransform,
    batch_objects,
    batches,
    first_rows,
    load_image_dataset,
    make_dataloader,
    object_columns,
    object_hints,
    weighted_mean,
)
from controlstack.training.diffusion import noisy_batch, sd_noise_scheduler
from controlstack.training.latents import training_rows
from controlstack.training.omni_tasks import pick_hints, validation_samples
from controlstack.training.rebalance import REGION_SOURCES, blank_value, preview_grid, rebalance
from controlstack.training.session import TrainingSession, make_lr_scheduler, make_optimizer
from controlstack.training.validation import (
    condition_fidelity,
    plot_metric,
    sample_controlnet,
    tensor_to_pil,
)

ARCHITECTURES = ("copy", "lite")


@dataclass
class ControlNetConfig(TrainConfig):
    base: str = ""                          # the base recipe's output: a Stable Diffusion folder
    condition: str = "canny"                # dataset column holding the hint image
    latent_cache: str = ""                  # file of the VAE's posterior per row (latents.py); "": encode every step
    # fine-tune this trained ControlNet (folder or single file) instead of copying the base's encoder;
    # diffusers' train_controlnet.py --controlnet_model_name_or_path; its own hint encoder is kept, so
    # hint_channels is unused then. "": a fresh copy (zero convs at 0)
    init_from: str = ""
    # hint encoder channels, one per stage: len - 1 stride-2 convs = log2(VAE downsampling) + 1 entries
    hint_channels: tuple[int, ...] = list_field(16, 32, 64, 128)
    # the ControlNet paper's architecture ablation (docs/paper-claims.md): copy = the trainable copy of
    # the encoder; lite = one convolution per block (models/lite.py). zero_init false: the zero
    # convolutions start at PyTorch's default initialisation instead (a "standard" convolution)
    architecture: str = "copy"
    zero_init: bool = True
    max_rows: int = 0                       # train on the first N rows of data only (0: all): the data-scale ablation
    caption_dropout: float = 0.5            # the paper: 50% of prompts replaced by ""
    use_ema: bool = False
    ema_decay: float = 0.9999
    learning_rate: float = 1e-5             # the paper's AdamW learning rate
    # Minimal Impact ControlNet, Sec. 4.1: silent-signal data rebalancing (0: off)
    rebalance_probability: float = 0.0      # chance that a sample's condition is cut to some of its regions
    rebalance_keep: tuple[float, ...] = list_field(0.2, 0.8)  # fraction of regions kept, drawn uniformly
    rebalance_regions: str = "instances"    # region source: instances (id map) | seg (colours) | slic
    rebalance_column: str = ""              # column of the id map / seg; "": the source's name
    # Sec. 4.2: the injection strategy in the training forward (the sampler's own: sum | mi | ...)
    injection: str = "sum"
    injection_options: dict = field(default_factory=dict)  # e.g. {reduce: position} for mi
    # Sec. 4.3, stage 2: L = L_diffusion + w * Asym(J_cn), Hutchinson-estimated (0: off)
    conservativity_weight: float = 0.0      # the paper: 0.01
    conservativity_probes: int = 1          # Rademacher probes per sample
    conservativity_batch: int = 0           # samples of the batch the term is estimated on; 0: all
    # validation sampling
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    conditioning_scale: float = 1.0
    # a transformer base (SD3, Flux; controlnet_transformer.py): the blocks the ControlNet copies (0: a quarter)
    controlnet_layers: int = 0
    output_dir: str = "outputs/train/controlnet"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.base != "", "config key 'base' is missing; set it to the base recipe's output folder (.../model)")
        require(self.condition != "", "config key 'condition' is empty; name the dataset column of the hint (e.g. canny)")
        require(len(self.hint_channels) >= 2 and all(c > 0 for c in self.hint_channels),
                "config key 'hint_channels' needs >= 2 positive entries")
        require(0.0 <= self.caption_dropout <= 1.0, "config key 'caption_dropout' must be in [0, 1]")
        require(self.object_column != self.condition,
                f"config keys 'object_column' and 'condition' both name '{self.condition}'; use two columns")
        require(0.0 < self.ema_decay < 1.0, "config key 'ema_decay' must be in (0, 1)")
        require(self.num_inference_steps >= 1, "config key 'num_inference_steps' must be >= 1")
        require(self.max_rows >= 0, "config key 'max_rows' must be >= 0 (0: every row)")
        require(self.controlnet_layers >= 0, "config key 'controlnet_layers' must be >= 0 (0: a quarter of the blocks)")
        require(self.architecture in ARCHITECTURES,
                f"config key 'architecture' is '{self.architecture}'; choose one of {', '.join(ARCHITECTURES)}")
        require(not self.init_from or (self.architecture == "copy" and self.zero_init),
                "config keys 'architecture' / 'zero_init' shape a fresh ControlNet; leave them at copy / true "
                "with 'init_from'")
        self._check_mi()

    def _check_mi(self) -> None:
        require(0.0 <= self.rebalance_probability <= 1.0, "config key 'rebalance_probability' must be in [0, 1]")
        require(len(self.rebalance_keep) == 2 and 0.0 <= self.rebalance_keep[0] <= self.rebalance_keep[1] <= 1.0,
                "config key 'rebalance_keep' must be [low, high] with 0 <= low <= high <= 1")
        require(self.rebalance_regions in REGION_SOURCES,
                f"config key 'rebalance_regions' is '{self.rebalance_regions}'; choose one of {', '.join(REGION_SOURCES)}")
        if self.rebalance_probability > 0:
            blank_value(self.condition)  # fails with one line for a condition without a blank value
            require(self.rebalance_region_column != self.condition,
                    f"config key 'rebalance_column' names the condition column '{self.condition}'; use the id map")
        require(isinstance(self.injection_options, dict),
                "config key 'injection_options' must be a mapping, e.g. {reduce: layer}")
        injection = make_injection(self.injection, **self.injection_options)  # unknown names / options fail here
        require(not injection.cond_only,
                f"config key 'injection': '{self.injection}' acts on a CFG half only; training has no CFG "
                "batch (use sum or mi)")
        require(self.conservativity_weight >= 0, "config key 'conservativity_weight' must be >= 0")
        require(self.conservativity_probes >= 1, "config key 'conservativity_probes' must be >= 1")
        require(self.conservativity_batch >= 0, "config key 'conservativity_batch' must be >= 0 (0: the whole batch)")

    @property
    def rebalance_region_column(self) -> str:
        """The dataset column of the region labels ("" for superpixels of the image)."""
        if self.rebalance_regions == "slic":
            return ""
        return self.rebalance_column or self.rebalance_regions


def load_base(path: str):
    """The locked base (float32, gradients off): any base ``controlstack`` loads -- a diffusers
    folder (e.g. the fp16 bundle) or an SD-1.x single file."""
    base = load(path)
    for module in (base.unet, base.vae, base.text_encoder):
        module.eval().requires_grad_(False)  # locked: F(x; Θ) never changes
    return base


def build_controlnet(unet, vae, hint_channels, init: str = "", architecture: str = "copy", zero_init: bool = True):
    """``ControlNetModel.from_unet``; the hint encoder must land exactly at latent resolution.
    With ``init`` (fine-tuning) the trained ControlNet there instead, checked against the base.
    ``architecture`` lite: ``LiteControlNetModel``; ``zero_init`` False: every zero convolution
    (the residual outputs and the hint encoder's last layer) re-initialised as nn.Conv2d does."""
    from diffusers import ControlNetModel  # local: heavy, only this path needs it

    if init:
        controlnet = load_controlnet(init)
        check_compatible(controlnet, unet)
        return controlnet.train()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    need = int(math.log2(factor)) + 1
    require(len(hint_channels) == need,
            f"config key 'hint_channels' has {len(hint_channels)} entries ({2 ** (len(hint_channels) - 1)}x "
            f"downsampling) but the base's VAE downsamples {factor}x; give it {need} entries")
    if architecture == "lite":
        from controlstack.models.lite import LiteControlNetModel  # local: heavy, only this path needs it

        model = LiteControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(hint_channels))
    else:
        model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(hint_channels))
    if not zero_init:
        for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block,
                     model.controlnet_cond_embedding.conv_out]:
            conv.reset_parameters()  # seeded by the session's set_seed, like the rest of the init
    return model


def controlnet_eps(unet, controlnet, noisy, t, text_emb, hint, injection=None, control_input=None,
                   control_text=None) -> torch.Tensor:
    """ε through the project's inference path: U-Net encode, ControlNet residuals, the injection
    strategy (default ``sum``; MIControlNet's stage 1: the sampler's ``mi`` object), decode.
    ``control_input``: what the ControlNet sees instead of ``noisy`` (the conservativity term
    differentiates along the ControlNet's path only; same values, another graph).
    ``control_text``: the ControlNet's own text embedding (Omni: the task token + caption)."""
    unet_r, cn_r = UNetRunner(unet), ControlNetRunner(controlnet)
    hint_features = cn_r.embed_hint(hint)
    h, mid, ctx = unet_r.encode(noisy, t, text_emb)
    residuals = cn_r(noisy if control_input is None else control_input, t,
                     text_emb if control_text is None else control_text, hint_features)
    adds = (injection or make_injection("sum"))(h, mid, [residuals])
    return unet_r.decode(h, mid, ctx, adds)


class ControlledUNet(torch.nn.Module):
    """Locked U-Net + trainable ControlNet, one module so DDP sees the whole forward."""

    def __init__(self, unet, controlnet, injection=None, text_encoder=None, task_tokens=None):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.injection = injection  # None: sum
        # Omni: the task tokens' rows train (a submodule, so checkpoints hold them); the text encoder
        # they sit in is locked and stays outside the module's parameters
        self.task_tokens = task_tokens
        self.__dict__["text_encoder"] = text_encoder

    def forward(self, noisy, t, text_emb, hint, control_input=None, control_ids=None) -> torch.Tensor:
        control_text = None if control_ids is None else self.text_encoder(control_ids)[0]
        return controlnet_eps(self.unet, self.controlnet, noisy, t, text_emb, hint, self.injection, control_input,
                              control_text)

    def trainable(self) -> list:
        return [*self.controlnet.parameters(), *([] if self.task_tokens is None else [self.task_tokens.vectors])]


def assert_locked(model: ControlledUNet, optimizer, *frozen) -> None:
    """The paper's contract: nothing of the base trains, every ControlNet weight does (and, for
    Omni, the task tokens' rows: nothing else of the text encoder)."""
    own = {id(p) for p in model.trainable()}
    for module in (model.unet, *frozen):
        assert not any(p.requires_grad for p in module.parameters() if id(p) not in own), \
            "a base-model weight requires grad"
    trainable = own
    assert all(p.requires_grad for p in model.trainable()), "a ControlNet weight is frozen"
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == trainable, "the optimiser must hold exactly the ControlNet's (and task tokens') parameters"


def train(config: ControlNetConfig, resume: bool = False):
    """Train and export the ControlNet; returns the path of the exported ControlNetModel folder."""
    base = load_base(config.base)
    if base.family.network != "unet":  # SD3 / Flux: their blocks, the flow-matching loss
        return controlnet_transformer.train(config, base, resume)
    session = TrainingSession(config, "controlnet", resume)
    acc = session.accelerator

    tasks = tuple(getattr(config, "tasks", ()))  # Omni (omni.py, omni_tasks.py): one hint column per task
    hint_columns = config.hint_columns() if tasks else {config.condition: "hint"}
    columns = {config.image_column: "image", config.caption_column: "text", **hint_columns, **object_columns(config)}
    regions = None
    if config.rebalance_probability > 0:
        column = config.rebalance_region_column
        if column and column not in columns:
            columns[column] = "regions_source"
        regions = (config.rebalance_regions, columns[column] if column else "")
    hints = (*hint_columns.values(), *object_hints(config))
    dataset = load_image_dataset(config.data, columns)
    val_set = load_image_dataset(config.validation_data, columns) if config.validation_data else dataset
    vae, text_encoder, tokenizer = base.vae.to(acc.device), base.text_encoder.to(acc.device), base.tokenizer

    task_tokens = task_ids = None
    if tasks:
        task_tokens, task_ids = _trainable_task_tokens(tokenizer, text_encoder, tasks, config)
    model = ControlledUNet(base.unet, build_controlnet(base.unet, vae, config.hint_channels, config.init_from,
                                                            config.architecture, config.zero_init),
                           make_injection(config.injection, **config.injection_options), text_encoder, task_tokens)
    model.controlnet.train()
    # the ControlNet learns the base's own parameterisation (ε or v), read from its scheduler config
    noise_scheduler = sd_noise_scheduler(base.scheduler_config.get("prediction_type", "epsilon"))

    cache, dataset, transform = training_rows(config.latent_cache, acc, vae, dataset, config.resolution, hints=hints,
                                              regions=regions)
    if config.max_rows:  # after the latent cache, which covers every row of the export by its index
        dataset = dataset.select(range(min(config.max_rows, len(dataset))))
    loader = make_dataloader(dataset, transform, config.batch_size, config.num_workers)
    val = first_rows(val_set, config.num_validation_images,
                     RowTransform(config.resolution, targets=("image",), hints=tuple(hint_columns.values()),
                                  caption="text"))

    groups = [{"params": list(model.controlnet.parameters())}]
    if task_tokens is not None:  # textual inversion: the tokens' own lr, no decay towards 0
        groups.append({"params": [task_tokens.vectors], "lr": config.token_learning_rate,
                       "weight_decay": 0.0})
    optimizer = make_optimizer(groups, config)
    lr_scheduler = make_lr_scheduler(optimizer, config, acc.num_processes)
    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel  # local: heavy, only this path needs it

        ema = EMAModel(model.controlnet.parameters(), decay=config.ema_decay)
        ema.to(acc.device)
        acc.register_for_checkpointing(ema)
    model, optimizer, loader, lr_scheduler = acc.prepare(model, optimizer, loader, lr_scheduler)
    assert_locked(acc.unwrap_model(model), optimizer, vae, text_encoder)
    session.restore()
    if regions is not None and session.is_main and session.step == 0:
        preview_rebalancing(session, dataset, regions)

    bar = session.progress()
    for batch in batches(acc, loader, session.micro) if not session.done else ():
        noisy, target, t, ids = noisy_batch(vae, noise_scheduler, tokenizer, batch, config.caption_dropout,
                                            session.step_generator(), acc.device, cache)
        objects = batch_objects(batch, config)
        control_ids = None
        if tasks:  # own random stream: a task per sample; the ControlNet reads "<task> caption"

            hint, k = pick_hints(batch, tasks, session.step_generator(stream=3))
            control_ids = with_task_token(ids, task_ids[k])
        else:
            hint = batch["hint"]
        if regions is not None:  # own random streams: the denoising draws stay what they are without MI
            hint, _ = rebalance(hint, batch["regions"], blank_value(config.condition), config.rebalance_probability,
                                config.rebalance_keep, session.step_generator(stream=1))
        with torch.no_grad():
            text_emb = text_encoder(ids)[0]
        with acc.accumulate(model), acc.autocast():
            if config.conservativity_weight > 0:
                loss = _mi_stage2_loss(model, noisy, t, text_emb, hint, target, objects, config, noise_scheduler,
                                       session.step_generator(stream=2), session)
            else:
                err = (model(noisy, t, text_emb, hint, control_ids=control_ids).float() - target.float()).pow(2)
                loss = weighted_mean(err, objects, config.object_weight)
            session.optimize(model, loss, optimizer, lr_scheduler)
        if not acc.sync_gradients:
            continue
        if ema is not None:
            ema.step(acc.unwrap_model(model).controlnet.parameters())
        session.end_step(bar, lr_scheduler)
        if session.should_validate() and session.is_main:
            validate(session, acc.unwrap_model(model), base, vae, text_encoder, val)
        if session.done:
            break
    bar.close()

    controlnet = acc.unwrap_model(model).controlnet.eval()
    if ema is not None:
        ema.copy_to(controlnet.parameters())
    vectors = task_tokens.rows() if task_tokens is not None else None
    return session.export(lambda d: _save(controlnet, d, config, vectors))


def _trainable_task_tokens(tokenizer, text_encoder, tasks, config):
    """Omni: the task tokens added to the tokenizer and text encoder (started from ``init_from``'s
    tokens when it is an Omni model, else fresh) and swapped in as the embedding's one trainable
    part; returns (the TaskTokenEmbedding, the tasks' token ids in ``tasks`` order)."""
    start = initial_vectors(text_encoder, tasks, config.seed)
    if config.init_from and (Path(config.init_from) / TOKENS_FILE).is_file():
        start.update({t: v for t, v in load_task_tokens(config.init_from).items() if t in start})
    ids = add_task_tokens(tokenizer, text_encoder, start)
    return swap_in_trainable(text_encoder, ids), torch.tensor([ids[t] for t in tasks])


def _save(controlnet, folder, config: ControlNetConfig, task_vectors=None) -> None:
    """The ControlNetModel folder and its ``controlstack.json`` (``io/settings.py``), so it is sampled
    as it was trained: a model trained with MI options records them and recommends its own mode
    (``mi``); any other (plain or Omni) the recommendation it inherits -- ``init_from``'s, else the
    mode the base declares for its ControlNets (:func:`~controlstack.io.settings.inherited`). Without
    it a ControlNet fine-tuned from a bundled one would fall back to ``balanced``, where the bundled
    model's small ControlNets barely act (README, "Control modes"). An Omni model also writes its task
    tokens (``task_tokens.safetensors``) and task list."""
    controlnet.save_pretrained(folder, safe_serialization=True)
    settings: dict = {}
    mi = {k: getattr(config, k) for k in ("injection", "injection_options", "rebalance_probability",
                                          "conservativity_weight")}
    if task_vectors is not None:
        save_task_tokens(task_vectors, folder)
        settings["omni"] = {"tasks": list(config.tasks)}
    if mi != {"injection": "sum", "injection_options": {}, "rebalance_probability": 0.0, "conservativity_weight": 0.0}:
        rec = {"mode": config.injection, **({"mode_options": config.injection_options} if config.injection_options else {})}
        settings.update(recommended=rec, training={"condition": config.condition, **mi})
    else:
        rec = inherited(config.init_from, config.base, config.injection)
        if rec:
            settings["recommended"] = rec
        if task_vectors is None:  # the condition it takes: what preprocess=True annotates with
            settings["training"] = {"condition": config.condition}
    if settings:
        write_settings(folder, settings)


def _mi_stage2_loss(model, noisy, t, text_emb, hint, target, objects, config, noise_scheduler, generator,
                    session) -> torch.Tensor:
    """``L_diffusion + w · Asym(J_cn)`` (MIControlNet eq. 18): one forward whose ControlNet sees a
    differentiable copy of the noisy latents and whose U-Net encoder sees them detached, so the
    vector-Jacobian products follow the ControlNet's path only (``conservativity.py``)."""
    n = config.conservativity_batch or noisy.shape[0]
    x_cn = noisy.detach().clone().requires_grad_(True)
    with twice_differentiable(noisy.device):
        out = model(noisy.detach(), t, text_emb, hint, control_input=x_cn)
        err = (out.float() - target.float()).pow(2)
        diffusion = weighted_mean(err, objects, config.object_weight)
        field_out = epsilon_part(out[:n], t[:n], noise_scheduler)
        asym_loss, asym = conservativity_loss(field_out, x_cn, config.conservativity_probes, generator)
    session.log_extra(asym=float(asym), diffusion_loss=float(diffusion.detach()))
    return diffusion + config.conservativity_weight * asym_loss


def preview_rebalancing(session: TrainingSession, dataset, regions, rows: int = 8) -> None:
    """``rebalance.png`` in the output folder: image | condition | kept regions | rebalanced, for the
    first rows, with the recipe's own settings (drawn from a fixed generator)."""
    cfg = session.config
    transform = RowTransform(cfg.resolution, targets=("image",), hints=("hint",), regions=regions)
    batch = first_rows(dataset, rows, transform)
    g = torch.Generator().manual_seed(cfg.seed)
    new, masks = rebalance(batch["hint"], batch["regions"], blank_value(cfg.condition), cfg.rebalance_probability,
                           cfg.rebalance_keep, g)
    preview_grid(batch["image"], batch["hint"], new, masks).save(session.out / "rebalance.png")


def _sampling_options(cfg: ControlNetConfig) -> dict:
    """The injection's options as the model was trained: ``mi`` at its own λ cap (the pipeline would
    cap a model object it cannot look up at the inference-only value)."""
    if cfg.injection != "mi":
        return dict(cfg.injection_options)

    return {"lambda_max": MinimalImpact(**cfg.injection_options).lambda_max, **cfg.injection_options}


@torch.no_grad()
def validate(session: TrainingSession, net: ControlledUNet, base, vae, text_encoder, val: dict) -> None:
    """Grid rows condition | generated | real, the condition fidelity and its curve."""
    cfg = session.config
    net.controlnet.eval()
    tasks = tuple(getattr(cfg, "tasks", ()))
    if tasks:  # Omni: row i shows task i mod K

        hints, generated, fidelity = validation_samples(net, base, vae, text_encoder, val, cfg)
    else:
        hints = tensor_to_pil(val["hint"], signed=False)
        generated = sample_controlnet(
            vae, text_encoder, base.tokenizer, net.unet, net.controlnet, base.scheduler_config,
            list(val["text"]), hints, cfg.resolution, cfg.num_inference_steps, cfg.guidance_scale,
            cfg.conditioning_scale, cfg.seed, cfg.injection, _sampling_options(cfg),
        )
        fidelity = condition_fidelity(cfg.condition, hints, generated)
    real = tensor_to_pil(val["image"], signed=True)
    make_grid([im for r in zip(hints, generated, real) for im in r], cols=3).save(
        session.out / "samples" / f"step-{session.step:07d}.png"
    )
    session.metrics.log(session.step, fidelity=fidelity)
    plot_metric(session.out / "metrics.csv", "fidelity", session.out / "fidelity.png",
                f"{cfg.condition} fidelity (edge F1, 2 px)")
    net.controlnet.train()
