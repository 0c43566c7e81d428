"""Recipe: train an IP-Adapter for a locked base, as the IP-Adapter paper does.

Ye et al., "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models"
(2023), Sec. 3.2: a frozen CLIP image encoder embeds the reference image, a small trainable
projection turns the embedding into a few image tokens, and every cross-attention layer of the
locked U-Net gains its own trainable key / value projections for them -- *decoupled* cross-attention,
``Z = Attn(Q, K_t, V_t) + λ · Attn(Q, K_i, V_i)`` (Eq. 5). ``W'_k, W'_v`` start as copies of the
layer's text ``W_k, W_v`` (the paper's training code); λ = 1 while training. The loss is the base's
own denoising objective (Eq. 6) with the image embedding as a second condition, and the paper's
dropout for classifier-free guidance on both: text and image condition each dropped at random
(Sec. 3.3: "drop text and image conditions ... 0.05 probability"; here independently, so both are
dropped ``p_text * p_image`` of the time). A dropped image is what the pipelines feed as the
negative: a zero image (the plus projection reads hidden states) or a zero embedding (plain).

The projection is the paper's "plus" variant (its Resampler: ``num_tokens`` learned queries
attending to the encoder's penultimate patch states, diffusers' ``IPAdapterPlusImageProjection``),
which keeps where things are in the reference -- what a scene's object colours need -- or the
plain one (the pooled embedding, 4 tokens). The reference is another view of the target: a random
square crop of ``reference_crop`` of its area, flipped half the time, so the adapter must carry
what the scene holds rather than copy pixels.

The forward pass is the project's inference path (``models/runner.py``: the U-Net with the image
embeddings in ``added_cond_kwargs``, as the sampler feeds them). Output: ``<output_dir>/model`` holds
``ip-adapter.safetensors`` in the layout IP-Adapter files have (``image_proj.*``, ``ip_adapter.N.to_k_ip``;
what diffusers' ``load_ip_adapter`` and ``Pipeline.load_ip_adapter`` read) and ``image_encoder/``.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from controlstack.errors import ControlstackError, require
from controlstack.io.png import make_grid
from controlstack.ip_adapter import ImagePrompt
from controlstack.models.runner import UNetRunner
from controlstack.prompting import project_prompts
from controlstack.training.config import TrainConfig, list_field
from controlstack.training.controlnet import load_base
from controlstack.training.data import RowTransform, batches, first_rows, load_image_dataset, make_dataloader
from controlstack.training.diffusion import noisy_batch, sd_noise_scheduler
from controlstack.training.latents import ROW, LatentCache, with_rows
from controlstack.training.session import TrainingSession, make_lr_scheduler, make_optimizer
from controlstack.training.validation import tensor_to_pil, validation_pipeline

PROJECTIONS = ("plus", "plain")
ADAPTER_FILE = "ip-adapter.safetensors"
ENCODER_DIR = "image_encoder"
DIM_HEAD = 64  # diffusers reads a plus projection's heads as to_q rows // 64, and its depth as 4
DEPTH = 4


@dataclass
class IPAdapterConfig(TrainConfig):
    base: str = ""                  # the locked base: a Stable Diffusion folder (the bundle) or single file
    # the frozen image encoder: a CLIPVisionModelWithProjection folder, or a CLIPModel folder whose vision
    # tower it takes (the bundle: the world CLIP, evaluation/clip)
    image_encoder: str = ""
    latent_cache: str = ""          # file of the VAE's posterior per row (latents.py); "": encode every step
    projection: str = "plus"        # plus: resampler over patch states | plain: pooled embedding, 4 tokens
    num_tokens: int = 16            # plus: the resampler's learned queries (image tokens per prompt)
    resampler_width: int = 128      # plus: its hidden width, a multiple of 64
    reference_crop: tuple[float, ...] = list_field(0.5, 0.9)  # area fraction of the reference's square crop
    reference_flip: float = 0.5
    caption_dropout: float = 0.05
    image_dropout: float = 0.05
    learning_rate: float = 1e-4     # the paper's AdamW settings
    adam_weight_decay: float = 1e-2
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    output_dir: str = "outputs/train/ip_adapter"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.base != "", "config key 'base' is missing; set it to the base model folder")
        require(self.image_encoder != "", "config key 'image_encoder' is missing; set it to a CLIP (vision) folder")
        require(self.projection in PROJECTIONS,
                f"config key 'projection' is '{self.projection}'; choose one of {', '.join(PROJECTIONS)}")
        require(self.num_tokens >= 1, "config key 'num_tokens' must be >= 1")
        require(self.resampler_width >= DIM_HEAD and self.resampler_width % DIM_HEAD == 0,
                f"config key 'resampler_width' must be a positive multiple of {DIM_HEAD} (diffusers reads heads "
                f"as width // {DIM_HEAD})")
        lo, hi = (self.reference_crop + (0.0, 0.0))[:2]
        require(len(self.reference_crop) == 2 and 0.0 < lo <= hi <= 1.0,
                "config key 'reference_crop' must be [low, high] with 0 < low <= high <= 1")
        for key in ("reference_flip", "caption_dropout", "image_dropout"):
            require(0.0 <= getattr(self, key) <= 1.0, f"config key '{key}' must be in [0, 1]")
        require(self.num_inference_steps >= 1, "config key 'num_inference_steps' must be >= 1")


# -- the image encoder --------------------------------------------------------------------------

def load_image_encoder(folder: str | Path):
    """A frozen ``CLIPVisionModelWithProjection``: the folder's own, or a ``CLIPModel``'s vision tower
    and projection (its ``projection_dim``: a CLIPModel's vision config carries a default one)."""
    # local: heavy, only this path needs it
    from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    p = Path(folder)
    require((p / "config.json").is_file(), f"image encoder '{p}' has no config.json; pass a CLIP folder")
    config = json.loads((p / "config.json").read_text())
    if config.get("model_type") == "clip":
        clip = CLIPModel.from_pretrained(p, torch_dtype=torch.float32)
        vision = CLIPVisionConfig(**{**clip.config.vision_config.to_dict(), "projection_dim": clip.config.projection_dim})
        encoder = CLIPVisionModelWithProjection(vision)
        encoder.vision_model.load_state_dict(clip.vision_model.state_dict())
        encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    else:
        encoder = CLIPVisionModelWithProjection.from_pretrained(p, torch_dtype=torch.float32)
    return encoder.eval().requires_grad_(False)


def preprocessor(folder: str | Path, size: int) -> dict:
    """The encoder's normalisation: the folder's preprocessor_config.json, else CLIP's defaults."""
    f = Path(folder) / "preprocessor_config.json"
    pre = json.loads(f.read_text()) if f.is_file() else {}
    return {"image_mean": pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
            "image_std": pre.get("image_std", [0.26862954, 0.26130258, 0.27577711]), "size": size}


def reference_views(images: torch.Tensor, crop: tuple[float, float], flip: float, size: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Another view of each target (``images`` in [-1, 1]): a random square crop of ``crop`` of its
    area, flipped with probability ``flip``, resized (bicubic) to the encoder's ``size``; in [0, 1]."""
    b, _, h, w = images.shape
    areas = torch.empty(b).uniform_(crop[0], crop[1], generator=generator)
    pos = torch.rand(b, 2, generator=generator)
    flips = torch.rand(b, generator=generator) < flip
    out = []
    for i in range(b):
        side = max(1, round(min(h, w) * float(areas[i]) ** 0.5))
        top, left = int(pos[i, 0] * (h - side)), int(pos[i, 1] * (w - side))
        view = images[i:i + 1, :, top:top + side, left:left + side]
        view = F.interpolate(view.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out.append(view.flip(-1) if flips[i] else view)
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


def normalise(x01: torch.Tensor, pre: dict) -> torch.Tensor:
    mean = torch.tensor(pre["image_mean"], device=x01.device)[:, None, None]
    std = torch.tensor(pre["image_std"], device=x01.device)[:, None, None]
    return (x01 - mean) / std


def encoder_input(encoder, pixels: torch.Tensor, plus: bool) -> torch.Tensor:
    """What the projection reads (diffusers' ``encode_image``): the penultimate hidden states (plus)
    or the projected pooled embedding (plain)."""
    if plus:
        return encoder(pixels, output_hidden_states=True).hidden_states[-2]
    return encoder(pixels).image_embeds


# -- the adapter's weights in the IP-Adapter file layout -----------------------------------------

def cross_attention_names(unet) -> list[str]:
    """The U-Net's cross-attention processors in diffusers' order: file key ``2 i + 1`` is the i-th
    (a plus projection, once installed, lists its own attention too: not the U-Net's)."""
    return [n for n in unet.attn_processors if not n.endswith("attn1.processor") and not n.startswith("encoder_hid_proj")]


def initial_state(unet, encoder, config: IPAdapterConfig) -> dict:
    """A fresh adapter in the file layout: a seeded projection and each layer's ``W'_k, W'_v`` copied
    from its text ``W_k, W_v`` (the paper's initialisation)."""
    # local: heavy, only this path needs it
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    cross = unet.config.cross_attention_dim
    if config.projection == "plus":
        proj = IPAdapterPlusImageProjection(
            embed_dims=encoder.config.hidden_size, output_dims=cross, hidden_dims=config.resampler_width,
            depth=DEPTH, dim_head=DIM_HEAD, heads=config.resampler_width // DIM_HEAD, num_queries=config.num_tokens)
    else:
        proj = ImageProjection(cross_attention_dim=cross, image_embed_dim=encoder.config.projection_dim,
                               num_image_text_embeds=4)
    modules = dict(unet.named_modules())
    ip = {}
    for i, name in enumerate(cross_attention_names(unet)):
        attn = modules[name.removesuffix(".processor")]
        ip[f"{2 * i + 1}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        ip[f"{2 * i + 1}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
    return {"image_proj": projection_to_file(proj.state_dict()), "ip_adapter": ip}


def projection_to_file(state: dict) -> dict:
    """diffusers' projection keys -> the IP-Adapter file's (the inverse of diffusers'
    ``_convert_ip_adapter_image_proj_to_diffusers`` for the plain and plus projections)."""
    if "image_embeds.weight" in state:  # plain: proj + norm
        return {k.replace("image_embeds", "proj"): v.detach().clone() for k, v in state.items()}
    out = {}
    for key, value in state.items():
        m = re.match(r"layers\.(\d+)\.(.+)", key)
        if not m:
            out[key] = value
            continue
        i, rest = m.groups()
        named = {"ln0.": "0.norm1.", "ln1.": "0.norm2.", "attn.to_q.": "0.to_q.", "attn.to_out.0.": "0.to_out.",
                 "ff.0.": "1.0.", "ff.1.net.0.proj.": "1.1.", "ff.1.net.2.": "1.3."}
        if rest.startswith("attn.to_k."):
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, state[f"layers.{i}.attn.to_v.weight"]])
            continue
        if rest.startswith("attn.to_v."):
            continue
        prefix = next(p for p in named if rest.startswith(p))
        out[f"layers.{i}.{named[prefix]}{rest[len(prefix):]}"] = value
    return {k: v.detach().clone() for k, v in out.items()}


def adapter_state(unet) -> dict:
    """The adapter installed on ``unet`` (``_load_ip_adapter_weights``) in the file layout, flat."""
    state = {f"image_proj.{k}": v for k, v in
             projection_to_file(unet.encoder_hid_proj.image_projection_layers[0].state_dict()).items()}
    for i, name in enumerate(cross_attention_names(unet)):
        processor = unet.attn_processors[name]
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = processor.to_k_ip[0].weight.detach().clone()
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = processor.to_v_ip[0].weight.detach().clone()
    return {k: v.contiguous() for k, v in state.items()}


def trainable(unet) -> list[torch.nn.Parameter]:
    """The adapter's parameters: the projection and every ``to_k_ip`` / ``to_v_ip``."""
    params = list(unet.encoder_hid_proj.parameters())
    for name in cross_attention_names(unet):
        processor = unet.attn_processors[name]
        params += [*processor.to_k_ip.parameters(), *processor.to_v_ip.parameters()]
    return params


class AdaptedUNet(torch.nn.Module):
    """The locked U-Net with the adapter's layers in it, one module so DDP sees the whole forward."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, noisy, t, text_emb, image_input) -> torch.Tensor:
        return UNetRunner(self.unet)(noisy, t, text_emb, added_cond_kwargs={"image_embeds": [image_input[:, None]]})  # one image per prompt


def train(config: IPAdapterConfig, resume: bool = False) -> Path:
    """Train and export the IP-Adapter; returns the output ``model`` folder."""
    session = TrainingSession(config, "ip_adapter", resume)
    acc = session.accelerator
    columns = {config.image_column: "image", config.caption_column: "text"}
    dataset = load_image_dataset(config.data, columns)
    val_set = load_image_dataset(config.validation_data, columns) if config.validation_data else dataset
    base = load_base(config.base)
    vae, text_encoder, tokenizer, unet = base.vae.to(acc.device), base.text_encoder.to(acc.device), \
        base.tokenizer, base.unet
    encoder = load_image_encoder(config.image_encoder).to(acc.device)
    pre = preprocessor(config.image_encoder, encoder.config.image_size)
    plus = config.projection == "plus"

    state = initial_state(unet, encoder, config)
    unet._load_ip_adapter_weights([state])
    params = trainable(unet)
    for p in params:
        p.requires_grad_(True)
    model = AdaptedUNet(unet).train()
    noise_scheduler = sd_noise_scheduler(base.scheduler_config.get("prediction_type", "epsilon"))

    cache = None
    transform = RowTransform(config.resolution, targets=("image",), caption="text")
    if config.latent_cache:  # the targets come from the cache; the image is still decoded for the reference
        with acc.main_process_first():
            cache = LatentCache.load_or_build(config.latent_cache, vae, dataset, config.resolution)
        dataset = with_rows(dataset)
        transform = RowTransform(config.resolution, targets=("image",), caption="text", passthrough=(ROW,))
    loader = make_dataloader(dataset, transform, config.batch_size, config.num_workers)
    val = first_rows(val_set, config.num_validation_images,
                     RowTransform(config.resolution, targets=("image",), caption="text"))

    optimizer = make_optimizer([{"params": params}], config)
    lr_scheduler = make_lr_scheduler(optimizer, config, acc.num_processes)
    model, optimizer, loader, lr_scheduler = acc.prepare(model, optimizer, loader, lr_scheduler)
    _assert_locked(acc.unwrap_model(model).unet, optimizer, params, vae, text_encoder, encoder)
    session.restore()

    bar = session.progress()
    for batch in batches(acc, loader, session.micro) if not session.done else ():
        noisy, target, t, ids = noisy_batch(vae, noise_scheduler, tokenizer, batch, config.caption_dropout,
                                            session.step_generator(), acc.device, cache)
        g = session.step_generator(stream=1)  # own stream: the denoising draws are the base recipe's
        views = reference_views(batch["image"], config.reference_crop, config.reference_flip,
                                encoder.config.image_size, g)
        pixels = normalise(views.to(acc.device), pre)
        drop = (torch.rand(len(pixels), generator=g) < config.image_dropout).to(acc.device)
        with torch.no_grad():
            text_emb = text_encoder(ids)[0]
            if plus:  # the negative the pipelines feed: the states of a zero image
                pixels = torch.where(drop[:, None, None, None], torch.zeros_like(pixels), pixels)
            image_input = encoder_input(encoder, pixels, plus)
            if not plus:  # ... or a zero embedding
                image_input = torch.where(drop[:, None], torch.zeros_like(image_input), image_input)
        with acc.accumulate(model), acc.autocast():
            loss = F.mse_loss(model(noisy, t, text_emb, image_input).float(), target.float())
            session.optimize(model, loss, optimizer, lr_scheduler)
        if not acc.sync_gradients:
            continue
        session.end_step(bar, lr_scheduler)
        if session.should_validate() and session.is_main:
            validate(session, acc.unwrap_model(model).unet, base, encoder, val)
        if session.done:
            break
    bar.close()
    adapted = acc.unwrap_model(model).unet
    return session.export(lambda d: save(adapted, encoder, config, d))


def _assert_locked(unet, optimizer, params, *frozen) -> None:
    """The paper's contract: the base and the image encoder are frozen, every adapter weight trains."""
    own = {id(p) for p in params}
    for module in (unet, *frozen):
        assert not any(p.requires_grad for p in module.parameters() if id(p) not in own), "a locked weight trains"
    assert all(p.requires_grad for p in params), "an adapter weight is frozen"
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == own, \
        "the optimiser must hold exactly the adapter's parameters"


def save(unet, encoder, config: IPAdapterConfig, folder: Path) -> None:
    """``ip-adapter.safetensors`` (file layout, fp32) and the image encoder folder beside it."""
    from safetensors.torch import save_file  # local: heavy, only this path needs it

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(unet), str(folder / ADAPTER_FILE),
              metadata={"projection": config.projection, "num_tokens": str(config.num_tokens)})
    encoder.save_pretrained(folder / ENCODER_DIR, safe_serialization=True)
    pre = Path(config.image_encoder) / "preprocessor_config.json"
    if pre.is_file():
        (folder / ENCODER_DIR / "preprocessor_config.json").write_text(pre.read_text())


@torch.no_grad()
def validate(session: TrainingSession, unet, base, encoder, val: dict) -> None:
    """Grid rows reference | generated with the image prompt | generated without | real, through the
    project's Pipeline (a copy of the U-Net, loading the adapter as users do)."""
    cfg = session.config
    g = torch.Generator().manual_seed(cfg.seed)
    refs = tensor_to_pil(reference_views(val["image"], cfg.reference_crop, 0.0, encoder.config.image_size, g),
                         signed=False)
    pipe = validation_pipeline(base.vae, base.text_encoder, base.tokenizer, copy.deepcopy(unet), base.scheduler_config)
    pipe.load_ip_adapter(_split(adapter_state(unet)), image_encoder=encoder, name="training")
    kw = dict(steps=cfg.num_inference_steps, cfg=cfg.guidance_scale, width=cfg.resolution, height=cfg.resolution,
              scheduler="ddim", progress=False)
    with project_prompts():
        with_ref = [pipe(p, [], image_prompts=[ImagePrompt(r)], seed=cfg.seed + i, **kw)[0]
                    for i, (p, r) in enumerate(zip(val["text"], refs))]
        without = [pipe(p, [], seed=cfg.seed + i, **kw)[0] for i, p in enumerate(val["text"])]
    real = tensor_to_pil(val["image"], signed=True)
    make_grid([im for row in zip(refs, with_ref, without, real) for im in row], cols=4).save(
        session.out / "samples" / f"step-{session.step:07d}.png")
    unet.train()


def _split(flat: dict) -> dict:
    out: dict = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        out[head][rest] = value
    return out


def check_output(folder: str | Path) -> Path:
    """The adapter file of a trained output folder (one line when it is not one)."""
    f = Path(folder) / ADAPTER_FILE
    if not f.is_file():
        raise ControlstackError(f"'{folder}' holds no {ADAPTER_FILE}; pass an IP-Adapter recipe's model folder")
    return f
