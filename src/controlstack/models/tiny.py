"""Tiny, seeded Stable-Diffusion-layout models built offline (for tests, demos and benchmarks).

They have the SD-1.x layout (down blocks with and without cross-attention, an 8x VAE, a CLIP text
encoder) at a width where a 20-step run takes well under a second on a laptop CPU. A tokenizer is
built from a byte-level vocabulary (every byte is a token, no merges), so nothing is downloaded.
"""

from __future__ import annotations

import itertools

import torch

from controlstack.models.components import SDComponents


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode table (the alphabet of CLIP's byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none is a merge."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def byte_level_tokenizer(max_length: int = 77, words: list[str] | None = None):
    """A ``CLIPTokenizer`` over bytes, optionally with whole-word tokens for ``words``.

    Each word in ``words`` becomes one token, which is how the world's tokenizer keeps captions
    short. BPE applies the lowest-ranked merge first, so merges added for one word can cut up
    another: with "and" spelt a+n -> an, an+d, "sand" becomes s|and and never s+a. So each word
    is first tokenized with the merges so far, and merges are added that join what is left, left
    to right, until a pass over all the words adds none.
    """
    from transformers import CLIPTokenizer  # local: heavy, only this path needs it

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for word in words or []:
            symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            while len(symbols) > 1:  # join what BPE leaves: a + b, ab + c, ...
                pair = (symbols[0], symbols[1])
                ranks.setdefault(pair, len(ranks))
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                symbols = _bpe(symbols, ranks)
                changed = True
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=max_length)


def tiny_unet(seed: int = 0, block_out_channels=(32, 64), cross_attention_dim: int = 32, sample_size: int = 8,
              in_channels: int = 4, **sdxl):
    """``in_channels=9``: an SD-inpainting-layout U-Net (latents + mask + masked-image latents).
    ``sdxl``: the SDXL layout's extra config (:func:`tiny_sdxl_unet`)."""
    from diffusers import UNet2DConditionModel  # local: heavy, only this path needs it

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **sdxl,
    ).eval()


#: SDXL's micro-conditioning: six numbers (original size, crop top-left, target size), each
#: embedded sinusoidally at this width (SDXL: 256) and concatenated with the pooled text embedding
TINY_TIME_EMBED_DIM = 8


def tiny_sdxl_unet(seed: int = 0, block_out_channels=(32, 64), text_dims=(32, 32), sample_size: int = 8,
                   in_channels: int = 4):
    """The SDXL U-Net layout at a tiny width: cross-attention over both text encoders' hidden
    states concatenated, linear attention projections, 2 transformer layers at the deeper level,
    and the ``text_time`` added embedding (pooled text + micro-conditioning ids)."""
    n = len(block_out_channels)
    return tiny_unet(
        seed, block_out_channels, cross_attention_dim=sum(text_dims), sample_size=sample_size,
        in_channels=in_channels, use_linear_projection=True, transformer_layers_per_block=(1,) + (2,) * (n - 1),
        addition_embed_type="text_time", addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED_DIM + text_dims[1],
    )


def tiny_vae(seed: int = 0, block_out_channels=(8, 16, 16, 16)):
    """An ``AutoencoderKL`` with 2**(len(blocks)-1) downsampling (8x by default, as SD)."""
    from diffusers import AutoencoderKL  # local: heavy, only this path needs it

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    ).eval()


def tiny_text_encoder(seed: int = 0, hidden_size: int = 32, vocab_size: int = 514, max_length: int = 77,
                      with_projection: bool = False):
    """A 2-layer CLIP text model; ``with_projection``: SDXL's second encoder, which also returns the
    projected pooled embedding (``CLIPTextModelWithProjection``)."""
    from transformers import (  # local: heavy, only this path needs it
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=hidden_size,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_sd(seed: int = 0, max_length: int = 16) -> SDComponents:
    """A complete tiny SD-1.x-layout model: 8x VAE, 2-level U-Net, 2-layer CLIP text encoder."""
    tokenizer = byte_level_tokenizer(max_length=max_length)
    return SDComponents(
        unet=tiny_unet(seed),
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_text_encoder(seed + 2, vocab_size=len(tokenizer), max_length=max_length),
        tokenizer=tokenizer,
    )


def tiny_sdxl(seed: int = 0, max_length: int = 16, text_dims=(32, 32)) -> SDComponents:
    """A complete tiny SDXL-layout model: two text encoders (the second with the pooled
    projection), the SDXL U-Net layout and an 8x VAE with SDXL's latent scaling factor."""
    tokenizer = byte_level_tokenizer(max_length=max_length)
    vae = tiny_vae(seed + 1)
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    return SDComponents(
        unet=tiny_sdxl_unet(seed, text_dims=text_dims),
        vae=vae,
        text_encoder=tiny_text_encoder(seed + 2, text_dims[0], len(tokenizer), max_length),
        tokenizer=tokenizer,
        text_encoder_2=tiny_text_encoder(seed + 3, text_dims[1], len(tokenizer), max_length, with_projection=True),
        tokenizer_2=byte_level_tokenizer(max_length=max_length),
    )


def tiny_controlnet(unet, seed: int = 0, randomize: bool = True, conditioning_channels=(8, 16, 32, 32)):
    """``ControlNetModel.from_unet``; with ``randomize`` the zero convolutions get small random
    weights so that the control has a visible effect in tests (a fresh one is an exact no-op).

    ``conditioning_channels`` has one entry per hint-encoder stage: len(channels) - 1 stride-2
    convs, whose 2**(len - 1) downsampling must match the VAE's (four entries for an 8x VAE).
    """
    from diffusers import ControlNetModel  # local: heavy, only this path needs it

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(conditioning_channels))
    if randomize:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            zero_layers = list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block]
            zero_layers.append(cn.controlnet_cond_embedding.conv_out)
            for layer in zero_layers:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.05)
    return cn.eval()


def tiny_union_controlnet(unet, seed: int = 0, num_control_type: int = 8, conditioning_channels=(8, 16, 32, 32)):
    """A ``ControlNetUnionModel`` (ProMax layout with 8 types by default) over an SDXL-layout U-Net,
    built as ``from_unet`` does but with the fusion transformer at the U-Net's first width
    (diffusers' default 320 is SDXL's; ``from_unet`` does not pass it on). Zero layers and the
    fusion's channel projection get small random weights so that the control acts."""
    from diffusers import ControlNetUnionModel  # local: heavy, only this path needs it

    torch.manual_seed(seed)
    c = unet.config
    width = c.block_out_channels[0]
    cn = ControlNetUnionModel(
        addition_embed_type=c.addition_embed_type, addition_time_embed_dim=c.addition_time_embed_dim,
        transformer_layers_per_block=c.transformer_layers_per_block, in_channels=4,
        down_block_types=c.down_block_types, block_out_channels=c.block_out_channels,
        layers_per_block=c.layers_per_block, norm_num_groups=c.norm_num_groups,
        cross_attention_dim=c.cross_attention_dim, attention_head_dim=c.attention_head_dim,
        use_linear_projection=c.use_linear_projection,
        projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim,
        conditioning_embedding_out_channels=tuple(conditioning_channels), num_control_type=num_control_type,
        num_trans_channel=width, num_trans_head=4, num_proj_channel=width,
    )
    for part in ("conv_in", "time_proj", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
        getattr(cn, part).load_state_dict(getattr(unet, part).state_dict(), strict=False)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for layer in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out,
                      cn.spatial_ch_projs]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.05)
    return cn.eval()
