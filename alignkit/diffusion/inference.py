"""Sampling images from a base pipeline, optionally with DRaFT+ LoRA adapters and annealed
importance guidance (AIG) between the two (`alignkit generate-images`: `sample_image_grid`; the
demo, validation), and the batch sampler DRaFT+ trains through (`sample_batch`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from alignkit.data.io import DataError, read_records
from alignkit.diffusion.images import save_grid
from alignkit.diffusion.pipeline import frozen, load_pipeline
from alignkit.diffusion.reward import load_image_reward
from alignkit.diffusion.sampling import decode, denoise, diversity, encode_prompts, initial_noise

__all__ = ["generate_images", "load_for_images", "read_prompts", "sample_batch", "sample_image_grid"]


def read_prompts(path: str, tokenizer, split: str | None = None, limit: int | None = None) -> list[str]:
    """The "prompt" strings of a records file (JSONL, builtin:captions, ...), each checked against
    the text encoder's context, errors naming the file and line."""
    prompts = []
    for record in read_records(path, split, limit):
        prompt = record.data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{record.source}: a prompt record needs a non-empty 'prompt' string")
        n_tokens = len(tokenizer(prompt).input_ids)
        if n_tokens > tokenizer.model_max_length:
            raise DataError(
                f"{record.source}: the prompt is {n_tokens} tokens; the text encoder takes at most "
                f"{tokenizer.model_max_length}"
            )
        prompts.append(prompt)
    if not prompts:
        raise DataError(f"{path}: no prompt records")
    return prompts


def load_for_images(model: str | None, lora: str | None, device: str | torch.device = "cpu"):
    """A pipeline from `model` (a local diffusers directory), with the adapters in `lora` (a
    `draftp` final/ directory) loaded on its UNet. Without `model`, the base that `lora` names."""
    if model is None:
        if lora is None:
            raise ValueError("give a base pipeline (--model), DRaFT+ adapters (--lora), or both")
        info_file = Path(lora) / "alignkit.json"
        if not info_file.is_file():
            raise FileNotFoundError(f"{lora}: no alignkit.json naming the base pipeline; pass --model")
        model = json.loads(info_file.read_text())["base"]
    pipe = frozen(load_pipeline(model, device))
    if lora is not None:
        if not (Path(lora) / "pytorch_lora_weights.safetensors").is_file():
            raise FileNotFoundError(f"not a LoRA directory (no pytorch_lora_weights.safetensors): {lora}")
        pipe.load_lora_weights(str(lora))
    return pipe


def sample_batch(
    pipe,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    *,
    grad_steps: int = 0,
    regularize: bool = False,
    schedule: str = "draft",
    eta: float = 0.0,
    autocast=contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch through `denoise` and the VAE: images (B, 3, H, W) in [-1, 1], float32 (with a graph
    through the last `grad_steps` steps and the decode), and the regulariser (0 unless asked)."""
    device = pipe.unet.device
    unet = pipe.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, device)  # (B, L, D)
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""], device).expand_as(cond)
    with autocast():
        result = denoise(
            unet,
            pipe.scheduler,
            torch.cat([uncond, cond]),
            initial_noise(shape, seeds, device),
            steps=steps,
            guidance=guidance,
            grad_steps=grad_steps,
            regularize=regularize,
            schedule=schedule,
            eta=eta,
        )
        images = decode(pipe.vae, result.latents)
    return images.float(), result.regularizer.float()


@torch.no_grad()
def generate_images(
    pipe,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    schedule: str = "draft",
    eta: float = 0.0,
    batch_size: int = 32,
    autocast=contextlib.nullcontext,
) -> torch.Tensor:
    """(P, S, 3, H, W) images in [-1, 1]: each prompt from each seed's x_T. `schedule` mixes
    the base and fine-tuned predictions (AIG; anything but `draft` needs adapters); a pipeline
    without adapters samples its own model with `draft`."""
    rows = [(p, s) for p in prompts for s in seeds]
    images = [
        sample_batch(
            pipe,
            [p for p, _ in chunk],
            [s for _, s in chunk],
            steps,
            guidance,
            schedule=schedule,
            eta=eta,
            autocast=autocast,
        )[0].cpu()
        for chunk in (rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
    ]
    return torch.cat(images).view(len(prompts), len(seeds), *images[0].shape[1:])


def sample_image_grid(
    out: str | Path,
    prompts: list[str],
    model: str | None = None,
    lora: str | None = None,
    schedule: str = "draft",
    n: int = 4,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    reward: str | None = None,
) -> dict:
    """`alignkit generate-images`: `n` images per prompt (seeds seed..seed+n-1) saved as a PNG grid at
    `out`, one row per prompt, and a summary (prompts, seeds, diversity, rewards if `reward` names
    one) at out.json, which is returned. `prompts` may be one records file (or builtin: name)."""
    if schedule != "draft" and lora is None:
        raise ValueError(f"--schedule {schedule}: mixing base and fine-tuned models needs --lora")
    pipe = load_for_images(model, lora)
    texts = prompts
    if len(prompts) == 1 and (Path(prompts[0]).is_file() or prompts[0].startswith("builtin:")):
        texts = read_prompts(prompts[0], pipe.tokenizer)
    seeds = list(range(seed, seed + n))
    images = generate_images(pipe, texts, seeds, steps, guidance, schedule)
    scores = load_image_reward(reward)(images.flatten(0, 1), [t for t in texts for _ in range(n)]) if reward else None
    save_grid(images, out, labels=texts)
    summary = {
        "prompts": texts,
        "seeds": seeds,
        "schedule": schedule,
        "diversity": diversity(images) if n > 1 else None,
    }
    if scores is not None:
        summary["rewards"] = scores.view(len(texts), n).tolist()
        summary["reward"] = float(scores.mean())
    Path(out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return summary
