"""PPO end to end through the real CLI on a tiny random Llama.

The learnable target: `vowel_reward`, the fraction of a response's characters that are vowels. A
random byte-level model starts near 5/256; the policy-gradient step has to raise it within a few
steps, which the oracle's reward would not show on a random model.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.config import find_config, load_config
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.recipes import ppo as ppo_recipe
from alignkit.training.checkpoint import model_tensors, read_model_state
from tests.conftest import read_metrics as metrics
from tests.conftest import run_recipe

VOWELS = ["reward.kind=function", "reward.function=tests.recipes.test_ppo:vowel_reward"]


def vowel_reward(prompts, responses):
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def reward_rise(m: list[dict]) -> float:
    """The mean rollout reward of the last 3 steps over that of the first 3. A random model starts
    near 0.03 vowels; one step's mean over 16-32 samples moves by ~0.006 with the sampling seed, so
    each end averages 3 steps (a single first step made a 2x test pass or fail by the seed alone)."""
    first, last = (sum(r["rollout/reward"] for r in rows) / 3 for rows in (m[:3], m[-3:]))
    return last / first


def ppo(out, *overrides, ok=True, env=None, nproc=None):
    return run_recipe("ppo", out, *overrides, ok=ok, env=env, nproc=nproc)


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "run"
    # 8 prompts x 4 samples a step: with 2 (the tiny config's) the reward's rise is lost in its noise
    ppo(out, *VOWELS, "ppo.steps=12", "sampling.n=4", "checkpoint.every=null", "monitor.kind=oracle")
    return out


def test_ppo_raises_the_reward_and_saves_actor_and_critic(learning_run):
    m = metrics(learning_run)
    assert [r["step"] for r in m] == list(range(1, 13))
    assert reward_rise(m) > 1.5, [r["rollout/reward"] for r in m]  # measured 2.04 (1.46 with 2 samples)
    assert m[-1]["rollout/kl"] > 0  # the actor moved away from the reference
    for key in (
        "rollout/advantages_mean",
        "rollout/returns_std",
        "rollout/values_mean",
        "rollout/ended_fraction",
        "actor/clip_fraction",
        "actor/approx_kl",
        "actor/entropy",
        "critic/value_loss",
        "critic/explained_variance",
        "kl_coef",
        "timing/generate_s",
        "timing/train_s",
        "rollout/monitor_reward",
    ):
        assert key in m[-1], key
    AutoModelForCausalLM.from_pretrained(learning_run / "final")
    critic = AutoModelForSequenceClassification.from_pretrained(learning_run / "critic/final")
    assert critic.config.num_labels == 1


def test_first_update_has_ratio_one_and_zero_kl(tmp_path):
    """Actor and reference start equal: KL 0; one minibatch, one epoch: every ratio is exactly 1
    (the old log-probs come from the same micro-batches), so nothing is clipped. And
    `checkpoint.save_final=false` writes neither the actor's nor the critic's final model."""
    out = tmp_path / "run"
    ppo(out, *VOWELS, "ppo.steps=1", "ppo.epochs=1", "ppo.minibatches=1", "checkpoint.save_final=false")
    assert not (out / "final").exists() and not (out / "critic/final").exists()
    step = metrics(out)[0]
    assert step["rollout/kl"] == 0.0
    assert step["actor/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert step["actor/approx_kl"] == pytest.approx(0.0, abs=1e-10)
    assert step["actor/clip_fraction"] == 0.0


def test_critic_warmup_trains_only_the_critic_first(tmp_path):
    out = tmp_path / "run"
    ppo(out, *VOWELS, "ppo.steps=3", "ppo.critic_warmup_steps=2", "checkpoint.save_final=false")
    m = metrics(out)
    assert ["actor/loss" in r for r in m] == [False, False, True]
    assert all("critic/value_loss" in r for r in m)
    assert m[1]["rollout/kl"] == 0.0  # the actor has not moved during the warm-up


def test_adaptive_kl_and_the_entropy_bonus(tmp_path):
    out = tmp_path / "run"
    ppo(
        out,
        *VOWELS,
        "ppo.steps=2",
        "ppo.target_kl=100",
        "ppo.kl_horizon=10",
        "ppo.entropy_coef=0.01",
        "checkpoint.save_final=false",
    )
    m = metrics(out)
    coefs = [r["kl_coef"] for r in m]
    # step 1: KL 0, far below target: error clipped to -0.2, 16 rollouts over a horizon of 10
    assert coefs == pytest.approx([0.05, 0.05 * (1 - 0.2 * 16 / 10)])
    # the entropy bonus enters the actor loss (both per-token means over the same tokens)
    for r in m:
        assert r["actor/loss"] == pytest.approx(r["actor/policy_loss"] - 0.01 * r["actor/entropy"], rel=1e-4)


def test_resume_after_a_kill_equals_an_uninterrupted_run(learning_run, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    ppo(whole, *VOWELS, "ppo.steps=4")
    first = ppo(killed, *VOWELS, "ppo.steps=4", ok=False, env={"ALIGNKIT_TEST_KILL_AT_STEP": "3"})
    assert first.returncode != 0 and (killed / "checkpoints/step_2/COMPLETE").is_file()
    assert model_tensors(killed / "checkpoints/step_2", "critic")  # both parts in one checkpoint
    ppo(killed, *VOWELS, "ppo.steps=4")
    a, b = metrics(whole), metrics(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in x:
            if not key.startswith(("timing/", "throughput/")):
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key
    wa, wb = load_file(str(whole / "final/model.safetensors")), load_file(str(killed / "final/model.safetensors"))
    assert all((wa[k] - wb[k]).abs().max() < 1e-6 for k in wa)


def test_lora_reference_is_the_base_with_adapters_off(tmp_path):
    """With LoRA the reference is the actor with its adapters off: the update moves the adapters
    (lora_B starts at zero) and leaves every base weight exactly as loaded, so the reference stays put."""
    out = tmp_path / "run"
    lora = ["model.lora.enabled=true", "model.lora.r=4"]
    ppo(out, *VOWELS, "ppo.steps=3", *lora, "optim.lr=1.0e-2")
    m = metrics(out)
    assert m[0]["rollout/kl"] == 0.0 and m[-1]["rollout/kl"] != 0.0
    AutoModelForCausalLM.from_pretrained(out / "final")  # merged
    cfg = load_config(ppo_recipe.Config, find_config("ppo", "tiny"), [f"output_dir={out}", *lora])
    initial = load_causal_lm(cfg.model, load_tokenizer(cfg.model), seed=cfg.train.seed).state_dict()
    trained = read_model_state(out / "checkpoints/step_2", "actor")  # after 8 updates
    assert trained.keys() == initial.keys()
    adapters = [k for k in initial if "lora_" in k]
    assert adapters and all(not torch.equal(trained[k], initial[k]) for k in adapters if "lora_B" in k)
    assert any(not torch.equal(trained[k], initial[k]) for k in adapters if "lora_A" in k)
    assert all(torch.equal(trained[k], initial[k]) for k in initial if "lora_" not in k)


def test_a_prompt_too_long_for_the_context_is_reported(tmp_path):
    result = ppo(tmp_path / "run", "data.max_seq_len=24", ok=False)
    assert result.returncode != 0
    assert "builtin:prompts?n=64&seed=0" in result.stderr and "the prompt is" in result.stderr
    assert "sampling.max_new_tokens=16 it exceeds data.max_seq_len=24" in result.stderr


def test_two_processes_split_the_rollouts(tmp_path):
    out = tmp_path / "run"
    ppo(out, *VOWELS, "ppo.steps=2", nproc=2)
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2]
    assert m[0]["rollout/samples"] == 16  # 8 prompts x 2 samples over both processes
    assert m[0]["rollout/kl"] == 0.0
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_fsdp_shards_actor_critic_and_reference_and_trains_like_ddp(tmp_path):
    """Under FSDP the actor, the critic and the frozen reference are sharded; generation gathers the
    actor whole first (no collective per token: the ranks' rollouts end at different lengths). The
    same rollouts, rewards, losses and KL as DDP, to float rounding, over two steps."""
    runs = {}
    for strategy in ("ddp", "fsdp"):
        ppo(tmp_path / strategy, *VOWELS, "ppo.steps=2", f"distributed.strategy={strategy}", nproc=2)
        runs[strategy] = metrics(tmp_path / strategy)
    keys = [k for k in runs["ddp"][0] if k.startswith(("rollout/", "actor/", "critic/")) and "_s" not in k[-2:]]
    assert "rollout/kl" in keys and "critic/value_loss" in keys
    for a, b in zip(runs["ddp"], runs["fsdp"]):
        assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-4, abs=1e-6)
    assert runs["fsdp"][1]["rollout/kl"] != 0.0  # the second step's rollouts left the reference
