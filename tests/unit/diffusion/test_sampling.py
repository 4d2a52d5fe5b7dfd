"""The DRaFT+ sampler: agreement with diffusers' own pipeline, truncated backprop, the regulariser,
annealed importance guidance, the diversity metric."""

from __future__ import annotations

import pytest
import torch

from alignkit.diffusion.pipeline import build_tiny_pipeline
from alignkit.diffusion.sampling import (
    aig_weight,
    decode,
    denoise,
    diversity,
    diversity_by_prompt,
    encode_prompts,
    initial_noise,
    parse_schedule,
)

PROMPTS = ["a red circle on blue", "a green square on white"]
STEPS, GUIDANCE = 4, 3.0


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline(seed=0)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    return pipe


def with_lora(pipe, perturb: float = 0.0):
    from peft import LoraConfig

    if "default" not in (getattr(pipe.unet, "peft_config", None) or {}):
        pipe.unet.add_adapter(
            LoraConfig(
                r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
            )
        )
    torch.manual_seed(1)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn_like(p) * perturb
    return [p for p in pipe.unet.parameters() if p.requires_grad]


def context(pipe, prompts=PROMPTS):
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    return torch.cat([encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]).expand_as(cond), cond])


def noise(pipe, seeds=(0, 1)):
    return initial_noise((4, 16, 16), list(seeds))


def test_sampler_matches_the_diffusers_pipeline(pipe):
    ours = denoise(pipe.unet, pipe.scheduler, context(pipe), noise(pipe), steps=STEPS, guidance=GUIDANCE)
    with torch.no_grad():
        images = decode(pipe.vae, ours.latents)
    theirs = pipe(
        PROMPTS, latents=noise(pipe), num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pt"
    ).images  # (B, 3, H, W) in [0, 1]
    torch.testing.assert_close((images + 1) / 2, theirs, atol=1e-5, rtol=1e-4)
    assert ours.graph_steps == []


def test_initial_noise_depends_only_on_each_rows_seed():
    torch.testing.assert_close(initial_noise((4, 8, 8), [5, 6])[1], initial_noise((4, 8, 8), [6])[0])


def test_truncated_backprop_keeps_a_graph_only_in_the_last_k_steps(pipe):
    with_lora(pipe, perturb=0.01)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    try:
        x_T = noise(pipe).requires_grad_(True)
        result = denoise(pipe.unet, pipe.scheduler, context(pipe), x_T, steps=STEPS, guidance=GUIDANCE, grad_steps=2)
    finally:
        hook.remove()
    assert result.graph_steps == [2, 3]
    # one UNet call per step (CFG batched), plus one initial-model call per graph step when regularising
    assert calls == [False, False, True, True]
    decode(pipe.vae, result.latents).mean().backward()
    assert x_T.grad is None  # the graph starts at step T - K: nothing reaches x_T


def _full_backprop_grads(pipe, params):
    """An independent DDIM + CFG loop with the graph kept everywhere (what K = T must equal)."""
    ctx, x = context(pipe), noise(pipe)
    pipe.scheduler.set_timesteps(STEPS)
    for t in pipe.scheduler.timesteps:
        uncond, cond = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
        x = pipe.scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
    loss = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample.clamp(-1, 1).mean()
    return torch.autograd.grad(loss, params)


def test_k_equal_to_t_is_full_backprop(pipe):
    params = with_lora(pipe, perturb=0.01)
    result = denoise(
        pipe.unet, pipe.scheduler, context(pipe), noise(pipe), steps=STEPS, guidance=GUIDANCE, grad_steps=STEPS
    )
    ours = torch.autograd.grad(decode(pipe.vae, result.latents).mean(), params)
    reference = _full_backprop_grads(pipe, params)
    assert sum(float(g.abs().sum()) for g in reference) > 0
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    # K = 1 differentiates less of the chain: a different (smaller-support) gradient
    one = denoise(pipe.unet, pipe.scheduler, context(pipe), noise(pipe), steps=STEPS, guidance=GUIDANCE, grad_steps=1)
    truncated = torch.autograd.grad(decode(pipe.vae, one.latents).mean(), params)
    assert any(not torch.allclose(a, b) for a, b in zip(truncated, reference))


def test_regulariser_is_zero_at_the_start_and_grows_as_the_adapters_move(pipe):
    with_lora(pipe, perturb=0.0)  # peft's LoRA starts with B = 0: the initial model exactly
    start = denoise(
        pipe.unet,
        pipe.scheduler,
        context(pipe),
        noise(pipe),
        steps=STEPS,
        guidance=GUIDANCE,
        grad_steps=1,
        regularize=True,
    )
    assert start.regularizer.item() == 0.0
    with_lora(pipe, perturb=0.05)
    moved = denoise(
        pipe.unet,
        pipe.scheduler,
        context(pipe),
        noise(pipe),
        steps=STEPS,
        guidance=GUIDANCE,
        grad_steps=1,
        regularize=True,
    )
    assert moved.regularizer.requires_grad
    # by hand: run to the last step, then the mean squared difference of the guided predictions
    # with the adapters on and off at that step's input
    ctx, x = context(pipe), noise(pipe)

    def guided(x, t):
        uncond, cond = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    with torch.no_grad():
        pipe.scheduler.set_timesteps(STEPS)
        *early, last = pipe.scheduler.timesteps
        for t in early:
            x = pipe.scheduler.step(guided(x, t), t, x).prev_sample
        on = guided(x, last)
        pipe.unet.disable_adapters()
        off = guided(x, last)
        pipe.unet.enable_adapters()
    expected = float((on - off).pow(2).mean())
    assert expected > 0 and moved.regularizer.item() == pytest.approx(expected, rel=1e-5)


def test_aig_schedules_by_hand():
    assert [aig_weight("linear", i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert aig_weight("power_2", 2, 5) == pytest.approx(0.25)
    assert [aig_weight("step_0.5", i, 5) for i in range(5)] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert aig_weight("base", 4, 5) == 0.0 and aig_weight("draft", 0, 5) == 1.0
    with pytest.raises(ValueError, match="unknown AIG schedule 'cosine'.*power_P"):
        parse_schedule("cosine")


def test_aig_endpoints_are_the_two_models(pipe):
    with_lora(pipe, perturb=0.05)

    def run(schedule: str) -> torch.Tensor:
        return denoise(
            pipe.unet, pipe.scheduler, context(pipe), noise(pipe), steps=STEPS, guidance=GUIDANCE, schedule=schedule
        ).latents

    draft, base, linear = run("draft"), run("base"), run("linear")
    pipe.unet.disable_adapters()
    plain = run("draft")
    pipe.unet.enable_adapters()
    torch.testing.assert_close(base, plain)
    assert not torch.allclose(draft, base) and not torch.allclose(linear, base) and not torch.allclose(linear, draft)


def test_mixing_without_adapters_is_refused():
    pipe = build_tiny_pipeline(seed=1)
    with pytest.raises(ValueError, match="LoRA adapters"):
        denoise(pipe.unet, pipe.scheduler, context(pipe), noise(pipe), steps=2, guidance=1.0, schedule="linear")


def test_diversity_by_hand():
    a = torch.zeros(3, 4, 4)
    images = torch.stack([torch.stack([a, a + 0.5, a - 0.5]), torch.stack([a, a, a])])  # (P=2, m=3)
    # prompt 0: pairwise RMS distances 0.5, 0.5, 1.0 -> mean 2/3; prompt 1: all 0
    assert diversity(images) == pytest.approx((2 / 3 + 0) / 2)
    assert diversity_by_prompt(images) == pytest.approx([2 / 3, 0.0])
    assert diversity_by_prompt(images)[0] == pytest.approx(diversity(images[:1]))
    with pytest.raises(ValueError, match="at least 2"):
        diversity(images[:, :1])


def test_a_prompt_longer_than_the_text_encoder_is_named(pipe):
    long = "a " + "red " * 40 + "circle on blue"
    with pytest.raises(ValueError, match="takes at most 16"):
        encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle on blue", long])
