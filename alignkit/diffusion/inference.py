"""Sampling images from a base pipeline, optionally with DRaFT+ LoRA adapters and annealed
importance guidance (AIG) between the two (`alignkit generate-images`, the demo, validation)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from alignkit.diffusion.sampling import decode, denoise, encode_prompts, initial_noise

__all__ = ["generate_images", "load_for_images"]


def load_for_images(model: str | None, lora: str | None, device: str | torch.device = "cpu"):
    """A pipeline from `model` (a local diffusers directory), with the adapters in `lora` (a
    `draftp` final/ directory) loaded on its UNet. Without `model`, the base that `lora` names."""
    from alignkit.diffusion.pipeline import load_pipeline

    if model is None:
        if lora is None:
            raise ValueError("give a base pipeline (--model), DRaFT+ adapters (--lora), or both")
        info_file = Path(lora) / "alignkit.json"
        if not info_file.is_file():
            raise FileNotFoundError(f"{lora}: no alignkit.json naming the base pipeline; pass --model")
        model = json.loads(info_file.read_text())["base"]
    pipe = load_pipeline(model, device)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    if lora is not None:
        if not (Path(lora) / "pytorch_lora_weights.safetensors").is_file():
            raise FileNotFoundError(f"not a LoRA directory (no pytorch_lora_weights.safetensors): {lora}")
        pipe.load_lora_weights(str(lora))
    return pipe


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                    schedule: str = "draft", eta: float = 0.0, batch_size: int = 32,
                    autocast=contextlib.nullcontext) -> torch.Tensor:
    """(P, S, 3, H, W) images in [-1, 1]: each prompt from each seed's x_T. `schedule` mixes
    the base and fine-tuned predictions (AIG; anything but `draft` needs adapters); a pipeline
    without adapters samples its own model with `draft`."""
    device = pipe.unet.device
    rows = [(p, s) for p in prompts for s in seeds]
    unet = pipe.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""], device)
    images = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [p for p, _ in chunk], device)
        with autocast():
            result = denoise(unet, pipe.scheduler, torch.cat([uncond.expand_as(cond), cond]),
                             initial_noise(shape, [s for _, s in chunk], device), steps=steps, guidance=guidance,
                             schedule=schedule, eta=eta)
            images.append(decode(pipe.vae, result.latents).float().cpu())
    return torch.cat(images).view(len(prompts), len(seeds), *images[0].shape[1:])
