"""What a LoRA file is, from its keys and shapes alone: kohya / sd-webui (``lora_unet_...``,
``lora_te_...``, ``lora_te1_`` / ``lora_te2_``), diffusers (``.lora.down`` / ``.lora_linear_layer``),
PEFT (``.lora_A`` / ``.lora_B``), or LyCORIS LoHa / LoKr (``hada_`` / ``lokr_``, which diffusers does
not read); its rank, what it adapts and the text width its cross-attention layers expect (768
SD-1.x, 1024 SD-2.x, 2048 SDXL). Used by ``inspect`` and by ``lora.py`` before anything loads."""

from __future__ import annotations


def describe(state: dict) -> dict:
    """A LoRA's format, rank, targets and text width from its keys and shapes (``state``: name ->
    tensor, or name -> shape as ``inspect`` reads them from the header)."""
    def shape(v) -> tuple:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    keys = list(state)
    if any(k.split(".")[-2].startswith(("hada_", "lokr_")) or ".hada_" in k or ".lokr_" in k for k in keys if "." in k):
        fmt = "lycoris-loha/lokr"
    elif all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        fmt = "kohya"
    elif any(".lora_A." in k or ".lora_B." in k for k in keys):
        fmt = "peft"
    elif any(".lora.down." in k or ".lora_linear_layer." in k or ".lora_down." in k for k in keys):
        fmt = "diffusers"
    else:
        fmt = "unknown"
    downs = [v for k, v in state.items() if k.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight",
                                                         "lora_linear_layer.down.weight"))]
    ranks = sorted({shape(v)[0] for v in downs})
    targets = tuple(t for t, marks in (("unet", ("lora_unet_", "unet.", "transformer.")),  # a transformer base: its denoiser
                                       ("text_encoder", ("lora_te_", "lora_te1_", "text_encoder.")),
                                       ("text_encoder_2", ("lora_te2_", "text_encoder_2.")))
                    if any(k.startswith(marks) for k in keys))
    if fmt == "peft" and not targets:  # a bare PEFT U-Net file: no component prefix
        targets = ("unet",)
    # the U-Net's cross-attention key projection reads the text width: 768 SD-1.x, 1024 SD-2.x, 2048 SDXL
    widths = {shape(v)[1] for k, v in state.items() if "attn2" in k and "to_k" in k
              and k.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight"))}
    return {"format": fmt, "rank": ranks[0] if len(ranks) == 1 else ranks, "targets": targets,
            "text_width": widths.pop() if len(widths) == 1 else None, "tensors": len(keys)}
