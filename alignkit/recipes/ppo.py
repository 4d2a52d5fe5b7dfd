"""RLHF with PPO: actor, critic, reference and reward (Schulman et al. 2017, "Proximal Policy
Optimization Algorithms"; Ouyang et al. 2022, InstructGPT; NeMo-Aligner's `train_gpt_ppo_actor.py`).

Roles: the actor (the policy, from `model`), the critic (a value head, from `critic.path`, by
default the reward model), the reference (frozen; the starting actor, or with LoRA the base with
adapters off) and the reward (any reward source: local model, HTTP server, function, oracle).
Per step s = 1..S:

    1. the actor samples `sampling.n` responses to each of `rollout.prompts_per_step` prompts
       (split over processes)
    2. the reward source scores each response: R
    3. one no-grad pass each: actor log-probs (old), reference log-probs, critic values, per token
    4. token rewards r_t = -beta * kl_t (+ R on the last token), kl_t by `ppo.kl_estimator`
       (k1, abs, k3); GAE(gamma, lambda) advantages and returns; advantages whitened with the
       statistics of every process's tokens
    5. `ppo.epochs` passes over the rollouts in `ppo.minibatches` minibatches: each minibatch is one
       critic step (clipped value loss) and one actor step (clipped surrogate - entropy bonus);
       rollouts that hit `sampling.max_new_tokens` without ending leave the actor loss (`ppo.train_unended`)
       but still train the critic. The first `ppo.critic_warmup_steps` steps train only the critic.
    6. with `ppo.target_kl`, the adaptive controller moves beta toward the target sequence KL

Losses are token sums normalised by the global token count of the minibatch (`optimizer_step`), so
the update does not depend on micro-batching or the number of processes. The steps shared with
`reinforce` (sampling and scoring, reference log-probs, the actor loss, update epochs, metrics)
are `alignkit.training.rl`'s. Metrics, per step, in
`metrics.jsonl`: rollout/ (reward, kl = sum_t (log pi - log pi_ref) per response, reward_with_kl,
response_tokens, ended_fraction, advantages/returns/values statistics, logprob_abs_diff_mean/_max:
the sampling engine's log-probs against the trainer's), actor/ (loss, clip_fraction, ratio, approx_kl
to the old policy, entropy, grad_norm), critic/ (value_loss, clip_fraction, explained_variance,
grad_norm), kl_coef, lr, timing/ (generate, score, logprobs, train, weight_sync seconds). Sampling
runs on the engine `sampling.backend` names (native, or vLLM fed the actor's weights after each step).
Checkpoints hold actor and critic (both in `checkpoints/step_N`; a critic on Ray ranks of its own,
`placement.critic`, in `critic_checkpoints/step_N`, written first) and beta; a resumed run repeats
nothing. `final/` is the actor; `critic/final/` the critic (both unless
`checkpoint.save_final: false`).

    alignkit run ppo --config tiny
    alignkit run ppo --config my.yaml model.path=runs/sft/final reward.kind=model reward.path=runs/rm/final
    torchrun --nproc-per-node 2 -m alignkit.cli run ppo --config tiny
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Literal

from pydantic import Field
from torch import Tensor

from alignkit.config import (
    DataConfig,
    DistributedConfig,
    OptimConfig,
    PlacementConfig,
    RecipeConfig,
    SamplingConfig,
    Section,
)
from alignkit.data.formats import read_prompt_records
from alignkit.losses.policy_gradient import adaptive_kl_coef, gae, kl_per_token, token_rewards, whiten
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.rewards import RewardSourceConfig, build_reward_source
from alignkit.training.critic import build_critic
from alignkit.training.distributed import Dist, wrap_frozen, wrap_model
from alignkit.training.loop import finish_step, reduce_metrics, resume, save_final, start_run
from alignkit.training.optim import build_optimizer, build_scheduler
from alignkit.training.remote_engine import rollout_engine
from alignkit.training.remote_reward import reward_source
from alignkit.training.rl import (
    RolloutConfig,
    actor_loss,
    actor_metrics,
    check_processes,
    draw_ahead,
    engine_gap,
    global_moments,
    mean_std,
    monitor_stats,
    push_weights,
    reference_logps,
    rollout_stats,
    sample_and_score,
    train_epochs,
    update_plan,
)
from alignkit.training.rollouts import (
    Rollout,
    pad,
    reduce_sums,
    token_logps,
    unpad,
)

__all__ = ["Config", "CriticConfig", "PPOConfig", "main"]


class PPOConfig(Section):
    steps: int = Field(100, ge=1)  # RL steps: rollout + update
    epochs: int = Field(1, ge=1)  # passes over each step's rollouts
    minibatches: int = Field(1, ge=1)  # optimizer steps per pass (actor and critic each)
    clip_eps: float = Field(0.2, gt=0.0)
    value_clip: float | None = Field(0.2, gt=0.0)  # None: unclipped value loss
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    kl_coef: float = Field(0.05, ge=0.0)  # beta, the KL penalty's initial coefficient
    kl_estimator: Literal["k1", "abs", "k3"] = "k1"
    target_kl: float | None = Field(None, gt=0.0)  # adaptive beta: the target KL per response (nats); None: fixed beta
    kl_horizon: int = Field(10000, ge=1)  # the adaptive controller's horizon, in rollouts
    entropy_coef: float = Field(0.0, ge=0.0)
    whiten_advantages: bool = True
    train_unended: bool = False  # keep rollouts cut by max_new_tokens in the actor loss
    critic_warmup_steps: int = Field(0, ge=0)  # the first steps train only the critic


class CriticConfig(Section):
    # A reward model directory (its head becomes the value head) or a causal LM (a new zero head).
    # Default: the reward model (`reward.path` with `reward.kind: model`), else the actor's model.
    path: str | None = None
    optim: OptimConfig = OptimConfig(lr=1e-5, schedule="constant")


class Config(RecipeConfig):
    data: DataConfig  # data.train: prompt records with "prompt" (text or messages)
    reward: RewardSourceConfig
    rollout: RolloutConfig = RolloutConfig()
    # Sampled as is (temperature 1, no top-k/top-p) the rollouts come from the policy being trained.
    sampling: SamplingConfig = SamplingConfig()
    ppo: PPOConfig = PPOConfig()
    critic: CriticConfig = CriticConfig()
    # A second reward source scored on every rollout and never trained on (e.g. the oracle next to a
    # learned reward model): `rollout/monitor_reward` falling while `rollout/reward` rises is reward hacking.
    monitor: RewardSourceConfig | None = None
    # Generation runs on each process's full copy of the model: DDP, not FSDP, across processes.
    distributed: DistributedConfig = DistributedConfig(strategy="ddp")
    placement: PlacementConfig = PlacementConfig()  # --launcher ray: generation engines of their own


def _advantages(
    rollouts: list[Rollout],
    old_logps: list[Tensor],
    ref_logps: list[Tensor],
    values: list[Tensor],
    scores: Tensor,
    kl_coef: float,
    pc: PPOConfig,
    d: Dist,
) -> tuple[dict[str, float], Tensor]:
    """Step 4: token rewards r_t = -beta kl_t (+ R at the last token), GAE advantages and returns,
    advantages whitened with every process's token statistics; all stored on the rollouts with the
    per-token (R,) log-probs and values. Returns the `rollout/` statistics (and the critic's explained
    variance) and the (B, T) per-token KL."""
    old_p, mask = pad(old_logps)  # (B, T)
    kl = kl_per_token(old_p, pad(ref_logps)[0], pc.kl_estimator) * mask
    values_p = pad(values)[0]
    token_r = token_rewards(kl, scores, mask, kl_coef)
    advantages, returns = gae(token_r, values_p, mask, pc.gamma, pc.lam)
    moments = {
        name: global_moments(x, mask, d)
        for name, x in (
            ("advantages", advantages),
            ("returns", returns),
            ("values", values_p),
            ("residual", returns - values_p),
        )
    }
    stats = {}
    for name in ("advantages", "returns", "values"):
        stats[f"rollout/{name}_mean"], stats[f"rollout/{name}_std"] = mean_std(moments[name])
    residual_std = mean_std(moments["residual"])[1]
    stats["critic/explained_variance"] = 1.0 - residual_std**2 / max(stats["rollout/returns_std"] ** 2, 1e-8)
    if pc.whiten_advantages:
        advantages = whiten(advantages, mask, moments["advantages"])
    for r, o, ref, v, a, ret in zip(
        rollouts, old_logps, ref_logps, values, unpad(advantages, mask), unpad(returns, mask)
    ):
        r.old_logps, r.ref_logps, r.values, r.advantages, r.returns = o, ref, v, a, ret
        r.trains_actor = r.is_end or pc.train_unended
    return stats, kl


# --- the recipe ------------------------------------------------------------------------------------


def main(cfg: Config) -> None:
    run = start_run(cfg)
    d, pc, rc = run.dist, cfg.ppo, cfg.rollout
    check_processes(cfg, d)
    records = read_prompt_records(cfg.data.train.path, cfg.data.train.split, cfg.data.train.limit)
    reward = reward_source(cfg, d)  # here, or on Ray ranks of its own (placement.reward)
    monitor = build_reward_source(cfg.monitor, device=str(d.device)) if cfg.monitor else None
    tokenizer = load_tokenizer(cfg.model)
    pad_id, lora = tokenizer.pad_token_id, cfg.model.lora.enabled
    # prompts, seeds and sums go by data-parallel rank: a tensor-parallel group samples in lockstep
    actor = wrap_model(
        load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed), d, cfg.distributed, tensor_parallel=True
    )
    reference = None
    if not lora:  # a frozen copy of the starting actor
        frozen = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed)
        reference = wrap_frozen(frozen, d, cfg.distributed, tensor_parallel=True)
    critic = build_critic(run, cfg, tokenizer)  # here, or on Ray ranks of its own (placement.critic)
    updates = pc.steps * pc.epochs * pc.minibatches
    actor_opt = build_optimizer(actor, cfg.optim)
    parts = {"actor": (actor, actor_opt, build_scheduler(actor_opt, updates, cfg.optim)), **critic.parts}

    start, extra, logger = resume(run, parts, pc.steps)
    critic.resume(start)
    kl_coef = extra.get("kl_coef", pc.kl_coef)
    engine = rollout_engine(cfg, actor, tokenizer, d, run.autocast)  # after resume: the resumed weights
    run.log.info(
        f"PPO: {pc.steps} steps of {rc.prompts_per_step} prompts x {cfg.sampling.n} samples, "
        f"{pc.epochs} epochs x {pc.minibatches} minibatches, {d.world_size} processes"
    )

    pool, ahead = (ThreadPoolExecutor(1, "draw-ahead") if rc.overlap else None), None

    for step in range(start, pc.steps):
        t0 = time.perf_counter()
        # --- 1-2. rollouts of this process's share of the step's prompts, scored -------------------
        # (one step off-policy: drawn during the last update, from the weights before it)
        stale = ahead is not None
        if stale:
            rollouts, scores, _, t_score = ahead.result()
            t_generate = time.perf_counter() - t0  # the wait for it
        else:
            rollouts, scores, t_generate, t_score = sample_and_score(run, cfg, engine, tokenizer, records, reward, step)
        if pool is not None and step + 1 < pc.steps:  # the next draw starts now, beside this update
            ahead = draw_ahead(pool, run, cfg, engine, tokenizer, records, reward, step + 1)
        t2 = time.perf_counter()

        # --- 3. old and reference log-probs, values: once, on the first epoch's micro-batches ------
        plans, forward = update_plan(run, rollouts, pc.epochs, pc.minibatches, step, pad_id)
        if stale:  # the behaviour policy is the engine's: the ratio corrects for the step it lags
            old_logps = [r.engine_logps for r in rollouts]
        else:
            old_logps = forward(lambda b: token_logps(actor, b)[0])
        ref_logps = forward(reference_logps(actor, reference, lora))
        values = critic.values(rollouts, step)
        t3 = time.perf_counter()

        # --- 4. KL-shaped token rewards, GAE, advantages whitened over all processes' tokens --------
        stats, kl = _advantages(rollouts, old_logps, ref_logps, values, scores, kl_coef, pc, d)
        metrics = {**rollout_stats(rollouts, d), **monitor_stats(monitor, rollouts, d)}
        if not stale:  # (stale: the old log-probs are the engine's own)
            metrics.update(engine_gap(rollouts, rc.tis_cap, d))  # engine vs trainer log-probs; TIS weights
        metrics["rollout/staleness"] = float(stale)
        sequence_kl = reduce_sums({"n": len(rollouts), "kl": float(kl.sum())}, d)
        metrics["rollout/reward_with_kl"] = metrics["rollout/reward"] - kl_coef * sequence_kl["kl"] / sequence_kl["n"]
        metrics.update(stats)

        # --- 5. PPO epochs: a critic step per minibatch, then an actor step per minibatch -------------
        train_actor = step >= pc.critic_warmup_steps
        actor_fn = partial(actor_loss, clip_eps=pc.clip_eps, entropy_coef=pc.entropy_coef)
        lr = parts["actor"][2].get_last_lr()[0]
        sums, units, metrics["critic/grad_norm"] = critic.train(rollouts, step)
        metrics.update({f"critic/{k}": v for k, v in reduce_metrics(sums, units, d).items()})
        if train_actor:
            sums, _, metrics["actor/grad_norm"] = train_epochs(
                run, parts["actor"], rollouts, plans, actor_fn, "actor_tokens", pad_id
            )
            metrics.update(actor_metrics(sums, d))
        t4 = time.perf_counter()
        metrics.update(push_weights(engine, actor, ahead))  # the next step samples from the updated policy

        # --- 6. adaptive KL coefficient -----------------------------------------------------------
        metrics["kl_coef"] = kl_coef
        if pc.target_kl is not None:
            kl_coef = adaptive_kl_coef(
                kl_coef, sequence_kl["kl"] / sequence_kl["n"], pc.target_kl, pc.kl_horizon, int(sequence_kl["n"])
            )
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
        critic.checkpoint(step + 1, pc.steps)  # a critic on its own ranks: saved before the trainer's step
        finish_step(run, logger, step, metrics, parts, {"kl_coef": kl_coef}, pc.steps)

    if pool is not None:
        pool.shutdown()
    logger.close()
    if cfg.checkpoint.save_final:
        save_final(run, actor, tokenizer)
        critic.save_final()
