"""DRaFT+: reward fine-tuning of a text-to-image diffusion model by backpropagating a
differentiable reward through the last sampling steps, with a regulariser that keeps the model
near where it started (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on
Differentiable Rewards" (DRaFT); NVIDIA's DRaFT+ adds the regulariser). Per step s = 1..S:

    1. draw `train.global_batch_size` prompts (each process its share) and a fresh x_T per prompt
    2. DDIM with classifier-free guidance over `sampling.steps` = T steps: the first T - K without
       a graph, the last K = `sampling.truncation_steps` with one (truncated backprop)
    3. decode x_0 through the frozen VAE (with a graph) and score the images: R(image, prompt)
    4. at the K graph steps the initial model (the UNet with its LoRA adapters off) predicts the
       noise at the same x_t: reg = mean_K ||eps_theta - eps_init||^2 / D (see
       `alignkit.diffusion.sampling`)
    5. L = -mean R + `draftp.kl_coeff` * reg (`alignkit.losses.diffusion`); the gradient reaches only
       the UNet's LoRA adapters (VAE and text encoder frozen); averaged over processes, clipped, one
       AdamW step

`draftp.kl_coeff: 0` is plain DRaFT. Before the first step, every `draftp.val_every` steps and at
the end, fixed
validation prompts x seeds are sampled: `val/reward`, `val/diversity` (mean pairwise RMS distance
between a prompt's images: the regulariser's purpose is to keep it) and a PNG grid with the
rewards in `validation/step_N.{png,json}`.

`final/` holds the LoRA adapters in diffusers' format (`pytorch_lora_weights.safetensors`: any
`StableDiffusionPipeline.load_lora_weights(final)` takes them) and `alignkit.json` naming the
base pipeline; `alignkit generate-images --lora final` samples from it, with annealed importance
guidance between the base and the fine-tuned model if asked.

    alignkit run draftp --config tiny
    alignkit run draftp --config my.yaml model.path=runs/shapes/base reward=runs/shapes/judge draftp.kl_coeff=0
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator

from alignkit.config import ConfigError, DatasetConfig, OptimConfig, RecipeConfig, Section, TrainConfig
from alignkit.diffusion.images import save_grid
from alignkit.diffusion.inference import generate_images, read_prompts, sample_batch
from alignkit.diffusion.pipeline import build_tiny_pipeline, frozen, load_pipeline, save_pipeline
from alignkit.diffusion.reward import load_image_reward
from alignkit.diffusion.sampling import diversity
from alignkit.losses.diffusion import draftp_loss
from alignkit.training.distributed import Dist, all_reduce_sum
from alignkit.training.loop import Run, finish_step, resume, start_run
from alignkit.training.optim import build_optimizer, build_scheduler

__all__ = ["Config", "DraftpConfig", "PipelineConfig", "ImageSamplingConfig", "main"]


class UNetLoraConfig(Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0.0)
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]  # the UNet's attention projections


class PipelineConfig(Section):
    path: str | None = None  # a local diffusers directory (StableDiffusionPipeline)
    tiny: bool = False  # a random tiny shape-world pipeline instead (tests, smoke runs)
    precision: Literal["fp32", "bf16_autocast"] = "fp32"
    lora: UNetLoraConfig = UNetLoraConfig()

    @model_validator(mode="after")
    def _path_or_tiny(self) -> PipelineConfig:
        if (self.path is None) == (not self.tiny):
            raise ValueError("set exactly one of `path` (a local diffusers pipeline) and `tiny: true`")
        return self


class ImageSamplingConfig(Section):
    steps: int = Field(50, ge=1)  # DDIM steps T
    guidance_scale: float = Field(7.5, ge=0.0)  # classifier-free guidance; 1 = none
    eta: float = Field(0.0, ge=0.0, le=1.0)  # DDIM noise; 0 = deterministic given x_T
    truncation_steps: int = Field(1, ge=1)  # K: steps that keep a graph (K = T: full backprop)


class DraftpConfig(Section):
    steps: int = Field(100, ge=1)  # optimizer steps
    kl_coeff: float = Field(1.0, ge=0.0)  # the "+" regulariser's weight; 0 = plain DRaFT
    val_every: int | None = Field(None, ge=1)  # steps between validations (always one at the end)
    val_prompts: int = Field(4, ge=1)  # the first N distinct training prompts ...
    val_seeds: int = Field(4, ge=2)  # ... each sampled from N fixed seeds (diversity needs >= 2)


class DraftpOptimConfig(OptimConfig):
    """NeMo-Aligner's SD defaults: lr 1e-4, no weight decay, 10 warm-up steps then constant, clip 10."""

    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float | None = Field(10.0, gt=0.0)


class DraftpTrainConfig(TrainConfig):
    global_batch_size: int = Field(4, ge=1)  # prompts (one image each) per optimizer step, over all processes
    micro_batch_size: int = Field(1, ge=1)  # images sampled together per process


class Config(RecipeConfig):
    model: PipelineConfig
    prompts: DatasetConfig  # records with a "prompt"
    reward: str  # a shape-world judge or CLIP directory, or package.module:function (images, prompts) -> (B,)
    sampling: ImageSamplingConfig = ImageSamplingConfig()
    draftp: DraftpConfig = DraftpConfig()
    optim: DraftpOptimConfig = DraftpOptimConfig()
    train: DraftpTrainConfig = DraftpTrainConfig()


def load_pipeline_for(cfg: PipelineConfig, seed: int):
    return frozen(build_tiny_pipeline(seed=seed) if cfg.tiny else load_pipeline(cfg.path))


def add_lora(unet, cfg: UNetLoraConfig, d: Dist) -> list[torch.nn.Parameter]:
    """LoRA adapters on the UNet (peft, B = 0 so the model starts as it was); the same initial A on
    every process. Returns the trainable parameters."""
    from peft import LoraConfig  # local: peft costs seconds of start-up

    unet.add_adapter(
        LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=cfg.target_modules)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"model.lora.target_modules={cfg.target_modules}: matched no UNet module")
    if d.enabled:
        for p in params:
            dist.broadcast(p.data, src=0)
    return params


def step_batch(prompts: list[str], step: int, batch: int, seed: int, d: Dist) -> tuple[list[str], list[int]]:
    """This process's prompts and noise seeds at `step`: a pure function of (seed, step), so a
    resumed run draws exactly what an uninterrupted one would."""
    rng = random.Random(f"{seed}:{step}")
    chosen = [rng.randrange(len(prompts)) for _ in range(batch)]
    share = batch // d.world_size
    mine = range(d.rank * share, (d.rank + 1) * share)
    return [prompts[chosen[i]] for i in mine], [seed * 1_000_003 + step * batch + i for i in mine]


def validate(
    run: Run, pipe, reward_fn, prompts: list[str], sc: ImageSamplingConfig, dc: DraftpConfig, step: int
) -> dict[str, float]:
    """Fixed prompts x seeds (on the main process): mean reward, diversity, and a PNG grid."""
    val_prompts = list(dict.fromkeys(prompts))[: dc.val_prompts]
    seeds = [10_000 + s for s in range(dc.val_seeds)]
    grid = generate_images(pipe, val_prompts, seeds, sc.steps, sc.guidance_scale, eta=sc.eta, autocast=run.autocast)
    with torch.no_grad():
        rewards = reward_fn(grid.flatten(0, 1).to(run.dist.device), [p for p in val_prompts for _ in seeds]).float()
    directory = run.output_dir / "validation"
    save_grid(grid, directory / f"step_{step}.png", labels=val_prompts)
    (directory / f"step_{step}.json").write_text(
        json.dumps(
            {"prompts": val_prompts, "seeds": seeds, "rewards": rewards.view(len(val_prompts), len(seeds)).tolist()},
            indent=1,
        )
    )
    return {"val/reward": float(rewards.mean()), "val/diversity": diversity(grid)}


def save_lora(run: Run, pipe, cfg: Config, name: str = "final") -> Path:
    """Adapters in diffusers' LoRA format plus `alignkit.json` naming the base pipeline (a tiny
    random base is saved at `output_dir/base` when the run starts)."""
    from diffusers import StableDiffusionPipeline  # local, with peft: seconds of start-up
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    directory = run.output_dir / name
    base = run.output_dir / "base" if cfg.model.tiny else Path(cfg.model.path)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
    (directory / "alignkit.json").write_text(
        json.dumps(
            {
                "kind": "draftp_lora",
                "base": str(base.resolve()),
                "sampling": cfg.sampling.model_dump(),
                "kl_coeff": cfg.draftp.kl_coeff,
            },
            indent=1,
        )
    )
    return directory


def main(cfg: Config) -> None:
    run = start_run(cfg)
    d, sc, dc = run.dist, cfg.sampling, cfg.draftp
    batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if batch % d.world_size:
        raise ConfigError(f"train.global_batch_size={batch} must divide by the number of processes ({d.world_size})")
    if sc.truncation_steps > sc.steps:
        raise ConfigError(f"sampling.truncation_steps={sc.truncation_steps} exceeds sampling.steps={sc.steps}")
    pipe = load_pipeline_for(cfg.model, cfg.train.seed).to(d.device)
    if cfg.model.tiny and d.is_main:  # so that final/ names a base that exists
        save_pipeline(pipe, run.output_dir / "base")
    prompts = read_prompts(cfg.prompts.path, pipe.tokenizer, cfg.prompts.split, cfg.prompts.limit)
    reward_fn = load_image_reward(cfg.reward, d.device)
    unet = pipe.unet
    params = add_lora(unet, cfg.model.lora, d)
    optimizer = build_optimizer(unet, cfg.optim)
    parts = {"unet": (unet, optimizer, build_scheduler(optimizer, dc.steps, cfg.optim))}
    start, _, logger = resume(run, parts, dc.steps, trainable_only=True)
    run.log.info(
        f"DRaFT{'+' if dc.kl_coeff else ''}: {dc.steps} steps x {batch} prompts, {sc.steps} DDIM steps, "
        f"backprop through the last {sc.truncation_steps}; {sum(p.numel() for p in params):,} LoRA parameters"
    )

    if start == 0:  # the base model's numbers, for comparison (logged as step 0)
        logger.log(0, _validate_on_main(run, pipe, reward_fn, prompts, sc, dc, 0))
    for step in range(start, dc.steps):
        t0 = time.perf_counter()
        mine, seeds = step_batch(prompts, step, batch, cfg.train.seed, d)
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3)  # reward, regulariser, loss (each summed over images)
        for i in range(0, len(mine), micro):
            texts = mine[i : i + micro]
            images, regularizer = sample_batch(
                pipe,
                texts,
                seeds[i : i + micro],
                sc.steps,
                sc.guidance_scale,
                grad_steps=sc.truncation_steps,
                regularize=True,
                eta=sc.eta,
                autocast=run.autocast,
            )
            loss_sum, image_sums = draftp_loss(reward_fn(images, texts), regularizer, dc.kl_coeff)
            (loss_sum / batch).backward()  # summed over processes below: the mean over the global batch
            sums += torch.stack([image_sums[k].cpu() for k in ("reward", "regularizer", "loss")])
        sum_gradients(params, d)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf")))
        lr = parts["unet"][2].get_last_lr()[0]
        optimizer.step()
        parts["unet"][2].step()
        reward, regularizer, loss = (all_reduce_sum(sums, d) / batch).tolist()
        metrics = {
            "reward": reward,
            "regularizer": regularizer,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "timing/step": time.perf_counter() - t0,
        }
        done = step + 1
        if done == dc.steps or (dc.val_every and done % dc.val_every == 0):
            metrics.update(_validate_on_main(run, pipe, reward_fn, prompts, sc, dc, done))
        finish_step(run, logger, step, metrics, parts, {}, dc.steps, trainable_only=True)
    logger.close()
    if cfg.checkpoint.save_final and d.is_main:
        run.log.info(f"saved LoRA adapters to {save_lora(run, pipe, cfg)}")


def sum_gradients(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Sum the adapters' gradients over processes, in one all-reduce. (Not DDP: the UNet runs
    several times per backward, with and without a graph and with its adapters toggled.)"""
    if not d.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), d)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def _validate_on_main(run: Run, pipe, reward_fn, prompts, sc, dc, step: int) -> dict[str, float]:
    """Validation metrics, computed on the main process and shared with the others (every process
    logs the same numbers, and only the main process writes the grid)."""
    result = [validate(run, pipe, reward_fn, prompts, sc, dc, step) if run.dist.is_main else None]
    if run.dist.enabled:
        dist.broadcast_object_list(result, src=0)
    return result[0]
