"""RLHF with PPO: actor, critic, reference and reward (Schulman et al. 2017, "Proximal Policy
Optimization Algorithms"; Ouyang et al. 2022, InstructGPT; NeMo-Aligner's `train_gpt_ppo_actor.py`).

Roles: the actor (the policy, from `model`), the critic (a value head, from `critic.path`, by
default the reward model), the reference (frozen; the starting actor, or with LoRA the base with
adapters off) and the reward (any reward source: local model, HTTP server, function, oracle).
Per step s = 1..S:

    1. the actor samples `rollout.samples_per_prompt` responses to each of `rollout.prompts_per_step`
       prompts (split over processes)
    2. the reward source scores each response: R
    3. one no-grad pass each: actor log-probs (old), reference log-probs, critic values, per token
    4. token rewards r_t = -beta * kl_t (+ R on the last token), kl_t by `ppo.kl_estimator`
       (k1, abs, k3); GAE(gamma, lambda) advantages and returns; advantages whitened with the
       statistics of every process's tokens
    5. `ppo.epochs` passes over the rollouts in `ppo.minibatches` minibatches: each minibatch is one
       critic step (clipped value loss) and one actor step (clipped surrogate - entropy bonus);
       rollouts that hit `max_new_tokens` without ending leave the actor loss (`ppo.train_unended`)
       but still train the critic. The first `ppo.critic_warmup_steps` steps train only the critic.
    6. with `ppo.target_kl`, the adaptive controller moves beta toward the target sequence KL

Losses are token sums normalised by the global token count of the minibatch (`optimizer_step`), so
the update does not depend on micro-batching or the number of processes. Metrics, per step, in
`metrics.jsonl`: rollout/ (reward, kl = sum_t (log pi - log pi_ref) per response, reward_with_kl,
response_tokens, ended_fraction, advantages/returns/values statistics), actor/ (loss, clip_fraction,
ratio, approx_kl to the old policy, entropy, grad_norm), critic/ (value_loss, clip_fraction,
explained_variance, grad_norm), kl_coef, lr, timing/ (generate, score, logprobs, train seconds).
Checkpoints hold actor and critic (`checkpoints/step_N`, `checkpoints/critic/step_N`) and beta; a
resumed run repeats nothing. `final/` is the actor; `critic/final/` the critic.

    alignkit run ppo --config tiny
    alignkit run ppo --config my.yaml model.path=runs/sft/final reward.kind=model reward.path=runs/rm/final
    torchrun --nproc-per-node 2 -m alignkit.cli run ppo --config tiny
"""

from __future__ import annotations

import contextlib
import math
import time
from functools import partial
from typing import Literal

import torch
from pydantic import Field

from alignkit.config import ConfigError, DataConfig, DistributedConfig, ModelConfig, OptimConfig, RecipeConfig, Section
from alignkit.data.io import DataError, read_records
from alignkit.losses.policy_gradient import (
    adaptive_kl_coef, gae, kl_per_token, masked_moments, ppo_policy_loss, token_rewards, value_loss,
    whiten)
from alignkit.models.loading import adapters_off, load_causal_lm, load_sequence_scorer, load_tokenizer
from alignkit.models.reward import RewardModelInfo
from alignkit.rewards import RewardSourceConfig, build_reward_source
from alignkit.training.distributed import Dist, all_reduce_sum, wrap_model
from alignkit.training.loop import Run, finish_step, optimizer_step, reduce_metrics, resume, save_final, start_run
from alignkit.training.optim import build_optimizer, build_scheduler
from alignkit.training.rollouts import (
    Rollout, RolloutConfig, collate_rollouts, epoch_plan, forward_rollouts, pad, reduce_sums, sample_rollouts,
    step_prompts, token_logps, token_values, unpad)

__all__ = ["Config", "CriticConfig", "PPOConfig", "actor_loss", "actor_metrics", "load_prompts", "main", "monitor_stats", "rollout_stats",
           "sample_and_score", "train_epochs",
           "train_on"]


class PPOConfig(Section):
    steps: int = Field(100, ge=1)  # RL steps: rollout + update
    epochs: int = Field(1, ge=1)  # passes over each step's rollouts
    minibatches: int = Field(1, ge=1)  # optimizer steps per pass (actor and critic each)
    clip_eps: float = 0.2
    value_clip: float | None = 0.2  # None: unclipped value loss
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # beta, the KL penalty's initial coefficient
    kl_estimator: Literal["k1", "abs", "k3"] = "k1"
    target_kl: float | None = None  # adaptive beta: the target KL per response (nats); None: fixed beta
    kl_horizon: int = 10000  # the adaptive controller's horizon, in rollouts
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    train_unended: bool = False  # keep rollouts cut by max_new_tokens in the actor loss
    critic_warmup_steps: int = 0  # the first steps train only the critic


class CriticConfig(Section):
    # A reward model directory (its head becomes the value head) or a causal LM (a new zero head).
    # Default: the reward model (`reward.path` with `reward.kind: model`), else the actor's model.
    path: str | None = None
    optim: OptimConfig = OptimConfig(lr=1e-5, schedule="constant")


class Config(RecipeConfig):
    data: DataConfig  # data.train: prompt records with "prompt" (text or messages)
    reward: RewardSourceConfig
    rollout: RolloutConfig = RolloutConfig()
    ppo: PPOConfig = PPOConfig()
    critic: CriticConfig = CriticConfig()
    # A second reward source scored on every rollout and never trained on (e.g. the oracle next to a
    # learned reward model): `rollout/monitor_reward` falling while `rollout/reward` rises is reward hacking.
    monitor: RewardSourceConfig | None = None
    # Generation runs on each process's full copy of the model: DDP, not FSDP, across processes.
    distributed: DistributedConfig = DistributedConfig(strategy="ddp")


# --- shared with the critic-free recipe (reinforce) -----------------------------------------------


def load_prompts(cfg) -> list[dict]:
    records = [r.data for r in read_records(cfg.data.train.path, cfg.data.train.split, cfg.data.train.limit)]
    for i, r in enumerate(records):
        if "prompt" not in r:
            raise DataError(f"{cfg.data.train.path}:{i + 1}: a prompt record needs a 'prompt' field")
    if not records:
        raise DataError(f"{cfg.data.train.path}: no prompt records")
    return records


def check_processes(cfg, d: Dist) -> None:
    if d.enabled and cfg.distributed.strategy != "ddp":
        raise ConfigError("distributed.strategy: RL recipes generate on each process's full model copy; use ddp")
    if cfg.rollout.prompts_per_step % d.world_size:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must divide by the number of "
                          f"processes ({d.world_size})")


def reference_logps(actor, reference, lora: bool):
    """fn(batch) -> (N,) log-probs under the reference (a frozen copy, or the actor without adapters)."""
    def fn(batch):
        with adapters_off(actor, lora) if reference is None else contextlib.nullcontext():
            return token_logps(reference if reference is not None else actor, batch)[0]
    return fn


def actor_loss(model, batch, clip_eps: float, entropy_coef: float = 0.0, kl_coef: float = 0.0,
               kl_estimator: str = "k3"):
    """The clipped surrogate over the tokens of `actor_mask`, minus `entropy_coef` x entropy, plus
    `kl_coef` x the per-token KL to the reference (GRPO's KL term; PPO puts its KL in the reward).
    Without `old_logps` in the batch (a single update per rollout) the old policy is the current one:
    ratio 1, and the gradient is the same, at no extra forward pass. Sums over tokens."""
    logps, entropy = token_logps(model, batch, entropy="grad" if entropy_coef else "detached")
    old = batch["old_logps"] if "old_logps" in batch else logps.detach()
    mask = batch["actor_mask"]
    loss, metrics = ppo_policy_loss(logps, old, batch["advantages"], mask, clip_eps)
    m = mask.to(logps.dtype)
    if entropy_coef:
        loss = loss - entropy_coef * (entropy * m).sum()
    metrics["entropy"] = (entropy.detach() * m).sum()
    if kl_coef:
        kl = kl_per_token(logps, batch["ref_logps"], kl_estimator) * m
        loss = loss + kl_coef * kl.sum()
        metrics["kl_loss"] = kl.detach().sum()
    metrics["loss"] = loss.detach()
    return loss, metrics


def critic_loss(model, batch, info: RewardModelInfo, normalize: bool, clip: float | None):
    values = token_values(model, batch, info, normalize)
    return value_loss(values, batch["values"], batch["returns"], batch["response_mask"], clip)


def train_on(run: Run, model, optimizer, scheduler, rollouts: list[Rollout], minibatch: list[list[int]],
             loss_fn, units: str, pad_id: int, skip: frozenset[int] = frozenset()) -> tuple[dict, float, float]:
    """One optimizer step on a minibatch (micro-batches of rollout indices); `units` names the
    normaliser: "actor_tokens" or "num_units" (every response token). Rollouts in `skip` have a loss
    of exactly zero (advantage 0 and no other term: a GRPO group whose samples all scored the
    same): they are left out of the forward and backward passes but counted in the normaliser, so
    the step is the same as with them. Every micro-batch keeps at least one rollout, so all
    processes run the same collectives. Returns (metric sums, global units, grad norm)."""
    batches = []
    for mb in minibatch:
        kept = [i for i in mb if i not in skip] or mb[:1]
        batch = collate_rollouts([rollouts[i] for i in kept], pad_id)
        batch["num_units"] = sum(len(rollouts[i].response_ids) for i in mb
                                 if units == "num_units" or rollouts[i].trains_actor)
        batches.append(batch)
    sums, global_units, _, grad_norm = optimizer_step(run, model, optimizer, batches, loss_fn)
    scheduler.step()
    return sums, global_units, grad_norm


def train_epochs(run: Run, part: tuple, rollouts: list[Rollout], plans: list, loss_fn, units: str, pad_id: int,
                 skip: frozenset[int] = frozenset()) -> tuple[dict, float, float]:
    """Every epoch's minibatches for one model (`part` = model, optimizer, scheduler), one optimizer
    step each (`train_on`). Actor and critic are separate models trained on fixed rollouts, so one
    can run after the other. Returns (metric sums, global units, mean grad norm) over all steps."""
    sums: dict = {}
    total_units, norms = 0.0, []
    for plan in plans:
        for minibatch in plan:
            step_sums, step_units, norm = train_on(run, *part, rollouts, minibatch, loss_fn, units, pad_id, skip)
            sums = {k: sums.get(k, 0) + v for k, v in step_sums.items()}
            total_units += step_units
            norms.append(norm)
    return sums, total_units, sum(norms) / len(norms)


def actor_metrics(sums: dict, d: Dist) -> dict[str, float]:
    """`actor/*` means over the tokens the updates computed (global)."""
    totals = reduce_metrics(sums, 1.0, d)
    tokens = max(totals.pop("tokens", 0.0), 1.0)
    return {f"actor/{k}": v / tokens for k, v in totals.items()}


def sample_and_score(run: Run, cfg, actor, tokenizer, records: list[dict], reward, step: int):
    """Steps 1-2 of every RL recipe: this process's share of step `step`'s prompts, sampled
    (`rollout.samples_per_prompt` each) and scored. Returns (rollouts with `score` set, (B,) scores,
    generation seconds, scoring seconds)."""
    d = run.dist
    t0 = time.perf_counter()
    indices = step_prompts(len(records), step, cfg.rollout.prompts_per_step, cfg.train.seed)[d.rank :: d.world_size]
    seed = cfg.train.seed + 1_000_003 * (step + 1) + 10_007 * d.rank
    rollouts = sample_rollouts(actor, tokenizer, records, indices, cfg.data.train.path, cfg.rollout,
                               cfg.data.max_seq_len, seed, cfg.data.chat_template, run.autocast)
    t1 = time.perf_counter()
    scores = reward([r.prompt for r in rollouts], [r.text for r in rollouts]).rewards.float()  # (B,)
    for r, score in zip(rollouts, scores.tolist()):
        r.score = score
    return rollouts, scores, t1 - t0, time.perf_counter() - t1


def rollout_stats(rollouts: list[Rollout], d: Dist) -> dict[str, float]:
    """Global means over every process's rollouts: reward, response length, ended fraction, and
    (when reference log-probs are there) kl = sum_t (log pi_old - log pi_ref) per response."""
    sums = {"n": len(rollouts), "reward": sum(r.score for r in rollouts),
            "tokens": sum(len(r.response_ids) for r in rollouts), "ended": sum(r.is_end for r in rollouts)}
    if rollouts and rollouts[0].ref_logps is not None and rollouts[0].old_logps is not None:
        sums["kl"] = sum(float((r.old_logps - r.ref_logps).sum()) for r in rollouts)
    g = reduce_sums(sums, d)
    n = max(g.pop("n"), 1.0)
    out = {"rollout/reward": g["reward"] / n, "rollout/response_tokens": g["tokens"] / n,
           "rollout/ended_fraction": g["ended"] / n, "rollout/samples": n}
    if "kl" in g:
        out["rollout/kl"] = g["kl"] / n
    return out


def monitor_stats(monitor, rollouts: list[Rollout], d: Dist) -> dict[str, float]:
    """`rollout/monitor_reward`: the monitoring source's mean over every process's rollouts."""
    if monitor is None:
        return {}
    scores = monitor([r.prompt for r in rollouts], [r.text for r in rollouts]).rewards
    g = reduce_sums({"n": len(rollouts), "sum": float(scores.sum())}, d)
    return {"rollout/monitor_reward": g["sum"] / max(g["n"], 1.0)}


def _global_moments(x: torch.Tensor, mask: torch.Tensor, d: Dist) -> torch.Tensor:
    """(3,) [sum, sum of squares, count] of x over the mask and over every process."""
    return all_reduce_sum(masked_moments(x, mask), d)


def _mean_std(moments: torch.Tensor) -> tuple[float, float]:
    total, total_sq, count = moments.tolist()
    mean = total / max(count, 1.0)
    return mean, math.sqrt(max(total_sq / max(count, 1.0) - mean**2, 0.0))


def _critic_model(cfg: Config) -> tuple[ModelConfig, RewardModelInfo]:
    """Where the critic starts: `critic.path`, else the reward model (reward.kind model), else the
    actor's own model with a new value head (zero at first). A reward model's head is kept, with
    its attribute weights and statistics (the value is w . a, standardised with the reward)."""
    from transformers import AutoConfig

    path = cfg.critic.path or (cfg.reward.path if cfg.reward.kind == "model" else None)
    if path is None:
        return cfg.model.model_copy(update={"lora": cfg.model.lora.model_copy(update={"enabled": False})}), \
            RewardModelInfo(["value"], [1.0])
    config = AutoConfig.from_pretrained(path)
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        info = RewardModelInfo.from_config(config)
    else:
        info = RewardModelInfo(["value"], [1.0])
    return ModelConfig(path=path, precision=cfg.model.precision), info


# --- the recipe ------------------------------------------------------------------------------------


def main(cfg: Config) -> None:
    run = start_run(cfg)
    d, pc, rc = run.dist, cfg.ppo, cfg.rollout
    check_processes(cfg, d)
    records = load_prompts(cfg)
    reward = build_reward_source(cfg.reward, device=str(d.device))
    monitor = build_reward_source(cfg.monitor, device=str(d.device)) if cfg.monitor else None
    tokenizer = load_tokenizer(cfg.model)
    pad_id, lora = tokenizer.pad_token_id, cfg.model.lora.enabled
    actor = wrap_model(load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed), d, cfg.distributed.strategy)
    reference = None
    if not lora:  # a frozen copy of the starting actor
        reference = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed).to(d.device).requires_grad_(False)
    critic_model, info = _critic_model(cfg)
    critic = wrap_model(load_sequence_scorer(critic_model, tokenizer, len(info.attributes), seed=cfg.train.seed), d,
                        cfg.distributed.strategy)
    updates = pc.steps * pc.epochs * pc.minibatches
    actor_opt, critic_opt = build_optimizer(actor, cfg.optim), build_optimizer(critic, cfg.critic.optim)
    parts = {"actor": (actor, actor_opt, build_scheduler(actor_opt, updates, cfg.optim)),
             "critic": (critic, critic_opt, build_scheduler(critic_opt, updates, cfg.critic.optim))}
    values_of = partial(token_values, info=info, normalize=cfg.reward.normalize)

    start, extra, logger = resume(run, parts, pc.steps)
    kl_coef = extra.get("kl_coef", pc.kl_coef)
    run.log.info(f"PPO: {pc.steps} steps of {rc.prompts_per_step} prompts x {rc.samples_per_prompt} samples, "
                 f"{pc.epochs} epochs x {pc.minibatches} minibatches, {d.world_size} processes")

    for step in range(start, pc.steps):
        t0 = time.perf_counter()
        # --- 1-2. rollouts of this process's share of the step's prompts, scored -------------------
        rollouts, scores, t_generate, t_score = sample_and_score(run, cfg, actor, tokenizer, records, reward, step)
        t2 = time.perf_counter()

        # --- 3. old and reference log-probs, values: once, on the first epoch's micro-batches ------
        plans = [epoch_plan(len(rollouts), pc.minibatches, cfg.train.micro_batch_size,
                            cfg.train.seed + pc.epochs * step + e) for e in range(pc.epochs)]
        first = [mb for mini in plans[0] for mb in mini]
        forward = partial(forward_rollouts, rollouts=rollouts, micro_batches=first, pad_id=pad_id, device=d.device,
                          autocast=run.autocast)
        old_logps = forward(lambda b: token_logps(actor, b)[0])
        ref_logps = forward(reference_logps(actor, reference, lora))
        values = forward(lambda b: values_of(critic, b))
        t3 = time.perf_counter()

        # --- 4. KL-shaped token rewards, GAE, advantages whitened over all processes' tokens --------
        old_p, mask = pad(old_logps)  # (B, T)
        kl = kl_per_token(old_p, pad(ref_logps)[0], pc.kl_estimator) * mask
        values_p = pad(values)[0]
        token_r = token_rewards(kl, scores, mask, kl_coef)
        advantages, returns = gae(token_r, values_p, mask, pc.gamma, pc.lam)
        moments = {name: _global_moments(x, mask, d) for name, x in
                   (("advantages", advantages), ("returns", returns), ("values", values_p),
                    ("residual", returns - values_p))}
        stats = {}
        for name in ("advantages", "returns", "values"):
            stats[f"rollout/{name}_mean"], stats[f"rollout/{name}_std"] = _mean_std(moments[name])
        if pc.whiten_advantages:
            advantages = whiten(advantages, mask, moments["advantages"])
        for r, o, ref, v, a, ret in zip(rollouts, old_logps, ref_logps, values, unpad(advantages, mask),
                                        unpad(returns, mask)):
            r.old_logps, r.ref_logps, r.values, r.advantages, r.returns = o, ref, v, a, ret
            r.trains_actor = r.is_end or pc.train_unended
        metrics = {**rollout_stats(rollouts, d), **monitor_stats(monitor, rollouts, d)}
        sequence_kl = reduce_sums({"n": len(rollouts), "kl": float(kl.sum())}, d)
        metrics["rollout/reward_with_kl"] = metrics["rollout/reward"] - kl_coef * sequence_kl["kl"] / sequence_kl["n"]
        metrics.update(stats)
        residual_std = _mean_std(moments["residual"])[1]
        metrics["critic/explained_variance"] = 1.0 - residual_std**2 / max(stats["rollout/returns_std"] ** 2, 1e-8)

        # --- 5. PPO epochs: a critic step per minibatch, then an actor step per minibatch -------------
        train_actor = step >= pc.critic_warmup_steps
        actor_fn = partial(actor_loss, clip_eps=pc.clip_eps, entropy_coef=pc.entropy_coef)
        critic_fn = partial(critic_loss, info=info, normalize=cfg.reward.normalize, clip=pc.value_clip)
        lr = parts["actor"][2].get_last_lr()[0]
        sums, units, metrics["critic/grad_norm"] = train_epochs(run, parts["critic"], rollouts, plans, critic_fn,
                                                                 "num_units", pad_id)
        metrics.update({f"critic/{k}": v for k, v in reduce_metrics(sums, units, d).items()})
        if train_actor:
            sums, _, metrics["actor/grad_norm"] = train_epochs(run, parts["actor"], rollouts, plans, actor_fn,
                                                                "actor_tokens", pad_id)
            metrics.update(actor_metrics(sums, d))
        t4 = time.perf_counter()

        # --- 6. adaptive KL coefficient -----------------------------------------------------------
        metrics["kl_coef"] = kl_coef
        if pc.target_kl is not None:
            kl_coef = adaptive_kl_coef(kl_coef, sequence_kl["kl"] / sequence_kl["n"], pc.target_kl, pc.kl_horizon,
                                       int(sequence_kl["n"]))
        metrics.update({"lr": lr, "timing/generate_s": t_generate, "timing/score_s": t_score,
                        "timing/logprobs_s": t3 - t2, "timing/train_s": t4 - t3,
                        "throughput/samples_per_s": metrics["rollout/samples"] / (t4 - t0)})
        finish_step(run, logger, step, metrics, parts, {"kl_coef": kl_coef}, pc.steps)

    logger.close()
    save_final(run, actor, tokenizer)
    if cfg.checkpoint.save_final:
        _save_critic(run, critic, tokenizer, info)


def _save_critic(run: Run, critic, tokenizer, info: RewardModelInfo) -> None:
    from transformers import AutoModelForSequenceClassification

    save_final(run, critic, tokenizer, info.config_updates(), AutoModelForSequenceClassification, "critic/final")
