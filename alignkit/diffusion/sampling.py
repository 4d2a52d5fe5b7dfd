"""DDIM sampling for DRaFT+: classifier-free guidance, truncated backprop, the "+" regulariser,
and annealed importance guidance (AIG) at inference.

One loop serves training and inference. Over the T scheduler steps i = 0..T-1 (noisiest first):

    eps_i = eps_uncond + g * (eps_cond - eps_uncond)          classifier-free guidance, scale g
    x_{i+1} = DDIM(x_i, eps_i)                                 eta 0: deterministic given x_0

Training (`grad_steps` = K >= 1): steps 0..T-K-1 run without a graph, the latents are detached,
and the last K steps (and the VAE decode after them) keep it: DRaFT's truncated backprop. K = T
is full backprop through the sampler.

The "+" regulariser (DRaFT+): at each of the K graph steps the initial model (the UNet with its
LoRA adapters disabled) predicts the noise at the same x_i, without a graph, and
`alignkit.losses.diffusion.noise_regularizer` gives

    reg = mean over the K steps of mean over elements of (eps_theta - eps_init)^2

i.e. ||eps_theta - eps_init||^2 / D, with D = the elements of one prediction batch. Both
predictions are the guided ones (the noise that actually moves the sample). At the first step of
training the adapters are zero (peft initialises LoRA's B to 0), so reg = 0 exactly.

Inference with AIG mixes the two models at every step, eps = (1 - w_i) eps_base + w_i eps_draft,
with w_i from a schedule over the progress s_i = i / (T - 1) (0 at the noisiest step, 1 at the
last): `base` 0, `draft` 1, `linear` s, `power_P` s^P (e.g. `power_2`), `step_F` 1 if s >= F
(e.g. `step_0.5`). Early steps set the layout, late steps the details, so `linear` keeps most of
the base model's diversity and most of the fine-tuned model's reward.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignkit.losses.diffusion import noise_regularizer

__all__ = [
    "DenoiseResult",
    "aig_weight",
    "decode",
    "denoise",
    "diversity",
    "diversity_by_prompt",
    "encode_prompts",
    "initial_noise",
    "parse_schedule",
]


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None) -> torch.Tensor:
    """(B, L, D) text-encoder states for the prompts (padded to the tokenizer's max length, as SD
    does). A prompt longer than the text encoder's context is an error naming it, not a silent cut."""
    limit = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=limit, truncation=False, return_tensors=None).input_ids
    for prompt, row in zip(prompts, ids):
        if len(row) > limit:
            raise ValueError(f"prompt {prompt!r} is {len(row)} tokens; the text encoder takes at most {limit}")
    with torch.no_grad():
        return text_encoder(torch.tensor(ids, device=device))[0]


def initial_noise(shape: tuple[int, ...], seeds: list[int], device=None) -> torch.Tensor:
    """(B, *shape) standard normal latents, row b drawn from its own generator seeded seeds[b]:
    a prompt and seed give the same image whatever else is in the batch."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


def parse_schedule(schedule: str) -> Callable[[float], float]:
    """An AIG schedule name -> w(s) for the progress s in [0, 1]."""
    if schedule == "base":
        return lambda s: 0.0
    if schedule == "draft":
        return lambda s: 1.0
    if schedule == "linear":
        return lambda s: s
    if m := re.fullmatch(r"power_(\d+(?:\.\d*)?)", schedule):
        p = float(m.group(1))
        return lambda s: s**p
    if m := re.fullmatch(r"step_(\d*\.?\d+)", schedule):
        f = float(m.group(1))
        return lambda s: float(s >= f)
    raise ValueError(
        f"unknown AIG schedule {schedule!r} (use base, draft, linear, power_P such as power_2, "
        f"or step_F such as step_0.5)"
    )


def _progress(i: int, steps: int) -> float:
    """s_i = i / (T - 1): 0 at the noisiest step, 1 at the last."""
    return i / (steps - 1) if steps > 1 else 1.0


def aig_weight(schedule: str, i: int, steps: int) -> float:
    """w_i, the fine-tuned model's weight at step i of `steps` (0 = noisiest)."""
    return parse_schedule(schedule)(_progress(i, steps))


def _guided(unet, x: torch.Tensor, t, context: torch.Tensor, guidance: float) -> torch.Tensor:
    """CFG noise prediction. context: (2B, L, D), the unconditional half first."""
    if guidance == 1.0:  # the unconditional half would get weight 0
        return unet(x, t, encoder_hidden_states=context[x.shape[0] :]).sample
    uncond, cond = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
    return uncond + guidance * (cond - uncond)


@contextlib.contextmanager
def adapters_disabled(unet):
    """The initial model: the same UNet with its (peft) LoRA adapters off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def _has_adapters(unet) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


@dataclass
class DenoiseResult:
    latents: torch.Tensor  # (B, C, h, w) the final latents (with a graph through the last K steps)
    regularizer: torch.Tensor  # () mean over the K graph steps of mean (eps_theta - eps_init)^2; 0 without
    graph_steps: list[int]  # the steps that kept a graph (for tests and logs)


def denoise(
    unet,
    scheduler,
    context: torch.Tensor,
    latents: torch.Tensor,
    *,
    steps: int,
    guidance: float,
    grad_steps: int = 0,
    regularize: bool = False,
    schedule: str = "draft",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> DenoiseResult:
    """Run the DDIM loop from `latents` (B, C, h, w) under `context` (2B, L, D: unconditional then
    conditional states). `grad_steps` K: the last K steps keep a graph (0: none, inference).
    `regularize`: compute the "+" term at those steps. `schedule`: AIG mixing with the initial model
    (needs LoRA adapters unless it is `draft`)."""
    if not 0 <= grad_steps <= steps:
        raise ValueError(f"grad_steps={grad_steps}: must be between 0 and the number of steps ({steps})")
    weight = parse_schedule(schedule)
    mixing = schedule != "draft"
    if (mixing or regularize) and not _has_adapters(unet):
        raise ValueError(
            "AIG schedules other than 'draft' and the regulariser need the UNet's LoRA adapters "
            "(the initial model is the UNet with them off)"
        )
    scheduler.set_timesteps(steps, device=latents.device)
    x = latents * scheduler.init_noise_sigma
    graph_steps, eps_graph, eps_initial = [], [], []
    grad_enabled = torch.is_grad_enabled()
    for i, t in enumerate(scheduler.timesteps):
        keep_graph = grad_enabled and i >= steps - grad_steps
        if keep_graph and not graph_steps:
            x = x.detach()  # truncated backprop: nothing before this step is differentiated
        with torch.set_grad_enabled(keep_graph):
            model_x = scheduler.scale_model_input(x, t)
            w = weight(_progress(i, steps))
            eps = _guided(unet, model_x, t, context, guidance) if w > 0 or not mixing else None
            if mixing and w < 1 or regularize and keep_graph:
                with adapters_disabled(unet), torch.no_grad():
                    eps_init = _guided(unet, model_x, t, context, guidance)
                if regularize and keep_graph:
                    eps_graph.append(eps)
                    eps_initial.append(eps_init)
                if mixing:
                    eps = eps_init if eps is None else (1 - w) * eps_init + w * eps
            x = scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample
        if keep_graph:
            graph_steps.append(i)
    regularizer = noise_regularizer(eps_graph, eps_initial).to(x.device)
    return DenoiseResult(latents=x, regularizer=regularizer, graph_steps=graph_steps)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] (differentiable; clamped, as a saved image would be)."""
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1.0, 1.0)


def diversity_by_prompt(images: torch.Tensor) -> list[float]:
    """Per prompt, the mean pairwise distance between its images.

    images: (P, m, 3, H, W) in [-1, 1], m >= 2 samples (seeds) per prompt. The distance of two
    images is the root-mean-square of their pixel difference (0 = identical; two independent
    uniformly random images in [-1, 1] are ~0.82 apart)."""
    P, m = images.shape[:2]
    if m < 2:
        raise ValueError("diversity needs at least 2 images per prompt")
    flat = images.reshape(P, m, -1).float()
    d = torch.cdist(flat, flat) / flat.shape[-1] ** 0.5  # (P, m, m)
    off_diagonal = ~torch.eye(m, dtype=torch.bool)
    return d[:, off_diagonal].mean(-1).tolist()


def diversity(images: torch.Tensor) -> float:
    """`diversity_by_prompt` averaged over prompts (each has the same number of images)."""
    per_prompt = diversity_by_prompt(images)
    return sum(per_prompt) / len(per_prompt)
