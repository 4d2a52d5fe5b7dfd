"""A tiny Stable-Diffusion-style pipeline for the shape world, as a real diffusers directory.

`build_tiny_pipeline` assembles the five parts DRaFT+ works on: a conditional UNet
(`UNet2DConditionModel`), a VAE (`AutoencoderKL`, 32x32 images <-> 4x16x16 latents), a CLIP text
encoder with a word-level tokenizer over the shape world's vocabulary, and a DDIM scheduler.
`save_pipeline` writes it with `StableDiffusionPipeline.save_pretrained`, so it loads back with
`StableDiffusionPipeline.from_pretrained` like any local SD checkpoint (and `load_pipeline` does so).

The scheduler uses `steps_offset=1` (SD's own setting): with diffusers' default of 0 the last DDIM step
lands on t = 0, where x_prev == x_t exactly and a one-step truncated backprop (DRaFT K = 1) gets a zero
gradient.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from alignkit.tasks.shapes import COLOURS, SHAPES

__all__ = ["build_tiny_pipeline", "frozen", "load_pipeline", "save_pipeline", "shape_tokenizer"]

_WORDS = ["a", "an", "on", *SHAPES, *COLOURS]


def shape_tokenizer():
    """A CLIP tokenizer whose vocabulary is the shape world's words (one token each) plus single
    characters (anything else still tokenizes)."""
    # local, like every import of diffusers and CLIP here: seconds of start-up, for DRaFT+ only
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in _WORDS:  # merge left to right: r e -> re, re d</w> -> red</w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    directory = Path(tempfile.mkdtemp(prefix="shape_tokenizer_"))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16, pad_token="<|endoftext|>"
    )


def build_tiny_pipeline(seed: int = 0, width: int = 32, text_width: int = 32):
    """A randomly initialised `StableDiffusionPipeline` for 32x32 shape-world images."""
    # local: diffusers and CLIP cost seconds of start-up
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = shape_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(width, 2 * width),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )
    # Attention only at 8x8 (the second block and the middle): at 16x16 it took 70% of a training
    # step on a CPU (256 tokens, head width 4) for nothing a global caption needs.
    # (`attention_head_dim` is the number of heads in diffusers' UNet2DConditionModel.)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(width, 2 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=4,
        layers_per_block=1,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def frozen(pipe):
    """The pipeline with its UNet, VAE and text encoder in eval mode and without gradients (adapters
    added later are trainable)."""
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    return pipe


def save_pipeline(pipe, directory: str | Path) -> Path:
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def load_pipeline(directory: str | Path, device: str = "cpu"):
    """A local diffusers directory (no downloads) as a `StableDiffusionPipeline`."""
    from diffusers import StableDiffusionPipeline  # local: seconds of start-up

    if not (Path(directory) / "model_index.json").is_file():
        raise FileNotFoundError(f"not a diffusers pipeline directory (no model_index.json): {directory}")
    return StableDiffusionPipeline.from_pretrained(
        directory, safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    ).to(device)
