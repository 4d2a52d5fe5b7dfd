"""Pretrain the shape world's base text-to-image model, the starting point of DRaFT+.

Two stages, as Stable Diffusion was built (only much smaller):

1. the VAE learns to reconstruct rendered shape-world images (MSE plus a small KL to N(0, I));
   its `scaling_factor` is then set to 1 / std of the latents, so the diffusion model sees
   unit-variance latents (SD's 0.18215 is the same idea);
2. the UNet learns to predict the noise added to those latents (epsilon-prediction over the
   scheduler's 1000 training timesteps), conditioned on the caption through the text encoder,
   which trains with it. 10% of captions are dropped to "" so classifier-free guidance works.

    alignkit shape-world --out runs/shapes            # base pipeline and reward judge (~6 min)

`build_shape_world` writes what DRaFT+ starts from: the pretrained pipeline (base/), the judge
trained first (judge/, the reward) and report.json. The pipeline is a plain diffusers directory.
It is deliberately under-trained: its images often get the colour, the shape or the background
wrong, which leaves a differentiable reward (the judge in `alignkit.diffusion.reward`) room to
improve it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alignkit.diffusion.pipeline import build_tiny_pipeline, save_pipeline
from alignkit.diffusion.reward import render_batch, train_shape_judge
from alignkit.tasks.shapes import shape_records

__all__ = ["build_shape_world", "pretrain_shape_pipeline"]


def _train_vae(
    vae,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    generator: torch.Generator,
    log: Callable[[str], None],
) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(reconstruction, x)
        loss = mse + kl_weight * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}: reconstruction mse {float(mse):.4f}")
    return float(mse)


def _train_unet(
    unet,
    text_encoder,
    scheduler,
    latents: torch.Tensor,
    ids: torch.Tensor,
    empty: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    log,
) -> float:
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    recent: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
        z0, caption_ids = latents[idx], ids[idx].clone()
        caption_ids[torch.rand(batch_size, generator=generator) < 0.1] = empty  # for classifier-free guidance
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        pred = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=text_encoder(caption_ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [float(loss)])[-50:]
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step}: noise mse {sum(recent) / len(recent):.4f}")
    return sum(recent) / len(recent)


def pretrain_shape_pipeline(
    n_images: int = 4000,
    vae_steps: int = 300,
    unet_steps: int = 1500,
    batch_size: int = 64,
    seed: int = 0,
    log: Callable[[str], None] = print,
):
    """A `StableDiffusionPipeline` pretrained on `n_images` rendered shape-world images, and a report
    (reconstruction and noise-prediction errors, seconds)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    pipe = build_tiny_pipeline(seed=seed)
    specs = shape_records(n_images, seed=seed + 1)
    images = render_batch(specs, seed + 1)  # (N, 3, 32, 32) in [-1, 1]
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    mse = _train_vae(vae, images, vae_steps, batch_size, 2e-3, 1e-4, generator, log)
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids

    ids, empty = tokenize([s.caption for s in specs]), tokenize([""])[0]
    noise_mse = _train_unet(
        unet, text_encoder, pipe.scheduler, latents, ids, empty, unet_steps, batch_size, 1e-3, generator, log
    )
    unet.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    report = {"vae_mse": mse, "unet_noise_mse": noise_mse, "images": n_images, "seconds": time.perf_counter() - start}
    return pipe, report


def build_shape_world(
    out: str | Path,
    unet_steps: int = 1500,
    vae_steps: int = 300,
    images: int = 4000,
    judge_images: int = 3000,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The shape world for DRaFT+ in `out`: a reward judge trained on `judge_images` rendered images
    (judge/), then a base pipeline pretrained on `images` (base/), and report.json; returns the
    report {"judge": held-out accuracies, "base": pretraining errors and seconds}."""
    root = Path(out)
    judge, judge_report = train_shape_judge(n=judge_images, seed=seed)
    judge.save(root / "judge")
    log(f"judge: {judge_report}")
    pipe, base_report = pretrain_shape_pipeline(
        n_images=images, vae_steps=vae_steps, unet_steps=unet_steps, seed=seed, log=log
    )
    save_pipeline(pipe, root / "base")
    report = {"judge": judge_report, "base": base_report}
    (root / "report.json").write_text(json.dumps(report, indent=1))
    return report
