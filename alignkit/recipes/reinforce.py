"""Critic-free policy gradient: RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE
Style Optimization for Learning from Human Feedback"; NeMo-Aligner's REINFORCE) and GRPO (Shao et
al. 2024, DeepSeekMath), chosen by `reinforce.estimator`. Rollouts, scoring and the actor update are
the RL core's (`alignkit.training.rl`, shared with `ppo`); there is no critic. Per step s = 1..S:

    1. the actor samples n = `sampling.n` >= 2 responses to each of `rollout.prompts_per_step` prompts
    2. the reward source scores them: R
    3. advantages per response, the same at each of its tokens:
         rloo  R~ = R - beta * sum_t kl_t  (k1 by default: the KL is part of the reward), and
               A_i = R~_i - mean of R~_j over the other *properly ended* samples j of the prompt
               (`ended_baseline: false`: over all the other samples)
         grpo  A_i = (R_i - mean_group R) / (std_group R + 1e-4)  (unbiased std; `scale_rewards:
               false` drops the division, Dr. GRPO); the KL enters the loss instead, beta * k3 per token
    4. `reinforce.epochs` x `reinforce.minibatches` steps of the clipped surrogate (token sum over
       the global token count: DAPO's "token-mean"). With one update per step the ratio is 1 and
       the gradient is REINFORCE's, so the old log-probs are not computed at all.

Reference log-probs are computed only when beta > 0. Metrics as PPO's (rollout/, actor/, timing/),
plus rollout/zero_variance_groups: the fraction of prompts whose n samples scored the same (they
give no signal: all right or all wrong).

    alignkit run reinforce --config tiny
    alignkit run reinforce --config tiny reinforce.estimator=grpo
    alignkit run reinforce --config my.yaml model.path=runs/sft/final reward.kind=function \\
        reward.function=alignkit.tasks.oracle:correct_answer_reward
"""

from __future__ import annotations

import time
from functools import partial
from typing import Literal

import torch
from pydantic import Field, model_validator

from alignkit.config import DataConfig, DistributedConfig, RecipeConfig, SamplingConfig, Section
from alignkit.data.formats import read_prompt_records
from alignkit.losses.policy_gradient import grpo_advantages, kl_per_token, rloo_advantages
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.rewards import RewardSourceConfig, build_reward_source
from alignkit.training.distributed import wrap_model
from alignkit.training.loop import finish_step, resume, save_final, start_run
from alignkit.training.optim import build_optimizer, build_scheduler
from alignkit.training.rl import (
    RolloutConfig,
    actor_loss,
    actor_metrics,
    check_processes,
    monitor_stats,
    reference_logps,
    rollout_stats,
    sample_and_score,
    train_epochs,
    update_plan,
)
from alignkit.training.rollouts import reduce_sums, token_logps

__all__ = ["Config", "ReinforceConfig", "main"]


class ReinforceConfig(Section):
    estimator: Literal["rloo", "grpo"] = "rloo"
    steps: int = Field(100, ge=1)
    epochs: int = Field(1, ge=1)
    minibatches: int = Field(1, ge=1)
    clip_eps: float = 0.2
    kl_coef: float = 0.01  # beta; 0: no reference model at all
    kl_estimator: Literal["k1", "abs", "k3"] | None = None  # default: k1 for rloo (reward), k3 for grpo (loss)
    scale_rewards: bool = True  # grpo: divide by the group's std
    train_unended: bool = True  # unended samples (cut by max_new_tokens) still train the actor
    # rloo: baselines average only the properly ended other samples (NeMo-Aligner); false: all of
    # them (TRL, OpenRLHF). With no ended other sample the advantage is 0.
    ended_baseline: bool = True


class Config(RecipeConfig):
    data: DataConfig  # data.train: prompt records with "prompt"
    reward: RewardSourceConfig
    rollout: RolloutConfig = RolloutConfig()
    sampling: SamplingConfig = SamplingConfig(n=4)  # n samples per prompt: the group of the baselines
    reinforce: ReinforceConfig = ReinforceConfig()
    monitor: RewardSourceConfig | None = None  # scored on every rollout, never trained on (see ppo)
    distributed: DistributedConfig = DistributedConfig(strategy="ddp")

    @model_validator(mode="after")
    def _groups_of_two(self) -> Config:
        if self.sampling.n < 2:
            raise ValueError(
                f"sampling.n={self.sampling.n}: {self.reinforce.estimator} compares the samples of one prompt; use >= 2"
            )
        return self


def advantages(rf: ReinforceConfig, rewards: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
    """(G, n) per-response advantages from (G, n) rewards (RLOO: KL-penalised)."""
    if rf.estimator == "rloo":
        return rloo_advantages(rewards, ended if rf.ended_baseline else None)
    return grpo_advantages(rewards, scale=rf.scale_rewards)


def main(cfg: Config) -> None:
    run = start_run(cfg)
    d, rf, rc = run.dist, cfg.reinforce, cfg.rollout
    check_processes(cfg, d)
    n = cfg.sampling.n
    estimator = rf.kl_estimator or ("k1" if rf.estimator == "rloo" else "k3")
    records = read_prompt_records(cfg.data.train.path, cfg.data.train.split, cfg.data.train.limit)
    reward = build_reward_source(cfg.reward, device=str(d.device))
    monitor = build_reward_source(cfg.monitor, device=str(d.device)) if cfg.monitor else None
    tokenizer = load_tokenizer(cfg.model)
    pad_id, lora = tokenizer.pad_token_id, cfg.model.lora.enabled
    actor = wrap_model(load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed), d, cfg.distributed.strategy)
    reference = None
    if rf.kl_coef and not lora:
        reference = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed).to(d.device).requires_grad_(False)
    optimizer = build_optimizer(actor, cfg.optim)
    parts = {"actor": (actor, optimizer, build_scheduler(optimizer, rf.steps * rf.epochs * rf.minibatches, cfg.optim))}
    start, _, logger = resume(run, parts, rf.steps)
    # The old policy's log-probs matter only when the policy moves between updates of one rollout
    # batch, or for the KL inside RLOO's reward.
    need_old = rf.epochs * rf.minibatches > 1 or (rf.estimator == "rloo" and rf.kl_coef > 0)
    run.log.info(f"{rf.estimator.upper()}: {rf.steps} steps of {rc.prompts_per_step} prompts x {n} samples")

    for step in range(start, rf.steps):
        t0 = time.perf_counter()
        # --- 1-2. n samples per prompt (this process's share of the prompts), scored ---------------
        rollouts, scores, t_generate, t_score = sample_and_score(run, cfg, actor, tokenizer, records, reward, step)
        t2 = time.perf_counter()

        # --- 3. log-probs where needed, then per-response advantages ---------------------------------
        plans, forward = update_plan(run, rollouts, rf.epochs, rf.minibatches, step, pad_id)
        if need_old:
            for r, o in zip(rollouts, forward(lambda b: token_logps(actor, b)[0])):
                r.old_logps = o
        if rf.kl_coef:
            for r, ref in zip(rollouts, forward(reference_logps(actor, reference, lora))):
                r.ref_logps = ref
        t3 = time.perf_counter()
        rewards = scores.clone()
        if rf.estimator == "rloo" and rf.kl_coef:
            rewards -= rf.kl_coef * torch.tensor(
                [float(kl_per_token(r.old_logps, r.ref_logps, estimator).sum()) for r in rollouts]
            )
        ended = torch.tensor([r.is_end for r in rollouts])
        adv = advantages(rf, rewards.view(-1, n), ended.view(-1, n)).reshape(-1)
        for r, a in zip(rollouts, adv.tolist()):
            r.advantages = torch.full((len(r.response_ids),), a)
            r.trains_actor = r.is_end or rf.train_unended
        metrics = {**rollout_stats(rollouts, d), **monitor_stats(monitor, rollouts, d)}
        flat = reduce_sums(
            {
                "groups": len(rollouts) // n,
                "zero_var": float((scores.view(-1, n).std(-1) == 0).sum()),
                "adv_abs": float(adv.abs().sum()),
                "reward_kl": float(rewards.sum()),
            },
            d,
        )
        metrics["rollout/zero_variance_groups"] = flat["zero_var"] / max(flat["groups"], 1)
        metrics["rollout/advantages_abs_mean"] = flat["adv_abs"] / metrics["rollout/samples"]
        if rf.estimator == "rloo" and rf.kl_coef:
            metrics["rollout/reward_with_kl"] = flat["reward_kl"] / metrics["rollout/samples"]

        # --- 4. clipped policy-gradient steps ----------------------------------------------------------
        kl_in_loss = rf.kl_coef if rf.estimator == "grpo" else 0.0
        loss_fn = partial(actor_loss, clip_eps=rf.clip_eps, kl_coef=kl_in_loss, kl_estimator=estimator)
        # Without a KL term in the loss, a rollout with advantage 0 contributes exactly nothing.
        skip = frozenset(i for i, a in enumerate(adv.tolist()) if a == 0.0) if not kl_in_loss else frozenset()
        lr = parts["actor"][2].get_last_lr()[0]
        sums, _, metrics["actor/grad_norm"] = train_epochs(
            run, parts["actor"], rollouts, plans, loss_fn, "actor_tokens", pad_id, skip
        )
        metrics.update(actor_metrics(sums, d))
        metrics["rollout/skipped_fraction"] = reduce_sums({"s": len(skip)}, d)["s"] / metrics["rollout/samples"]
        t4 = time.perf_counter()
        metrics.update(
            {
                "lr": lr,
                "timing/generate_s": t_generate,
                "timing/score_s": t_score,
                "timing/logprobs_s": t3 - t2,
                "timing/train_s": t4 - t3,
                "throughput/samples_per_s": metrics["rollout/samples"] / (t4 - t0),
            }
        )
        finish_step(run, logger, step, metrics, parts, {}, rf.steps)

    logger.close()
    if cfg.checkpoint.save_final:
        save_final(run, actor, tokenizer)
