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

import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Literal

import torch
from pydantic import Field, model_validator

from alignkit.config import (
    DataConfig,
    DistributedConfig,
    ModelConfig,
    PlacementConfig,
    RecipeConfig,
    SamplingConfig,
    Section,
)
from alignkit.data.formats import read_prompt_records
from alignkit.losses.policy_gradient import (
    grpo_advantages,
    kl_per_token,
    overlong_penalty,
    reinforce_pp_advantages,
    reverse_kl_advantages,
    rloo_advantages,
    token_weights,
    whiten,
)
from alignkit.models.loading import load_causal_lm, load_tokenizer, unwrap
from alignkit.rewards import RewardSourceConfig, build_reward_source
from alignkit.rewards.judge import ChatClient, teacher_scores
from alignkit.training.distributed import wrap_frozen, wrap_model
from alignkit.training.loop import finish_step, resume, save_final, start_run
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
    monitor_stats,
    push_weights,
    reference_logps,
    reverse_kl_loss,
    rollout_stats,
    sample_useful_groups,
    train_epochs,
    update_plan,
)
from alignkit.training.rollouts import reduce_sums, token_logps

__all__ = ["Config", "ReinforceConfig", "main"]


GROUP_ESTIMATORS = ("rloo", "grpo", "reinforce_pp_baseline")  # compare the samples of one prompt


class ReinforceConfig(Section):
    # onpolicy_distill: no reward; each token's advantage is log pi_teacher - log pi_student
    estimator: Literal["rloo", "grpo", "reinforce_pp", "reinforce_pp_baseline", "onpolicy_distill"] = "rloo"
    steps: int = Field(100, ge=1)
    epochs: int = Field(1, ge=1)
    minibatches: int = Field(1, ge=1)
    # the surrogate: ppo (clipped token ratios), gspo (one clipped ratio per sequence), cispo
    # (REINFORCE with clipped, detached token ratios as weights)
    policy_loss: Literal["ppo", "gspo", "cispo"] = "ppo"
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    clip_eps: float = Field(0.2, gt=0.0)
    clip_eps_high: float | None = Field(None, gt=0.0)  # DAPO's clip-higher (0.28); default clip_eps
    kl_coef: float = Field(0.01, ge=0.0)  # beta; 0: no reference model at all
    # default: k1 for rloo and reinforce_pp (in the reward), k3 for grpo (in the loss)
    kl_estimator: Literal["k1", "abs", "k3"] | None = None
    scale_rewards: bool = True  # grpo: divide by the group's std
    train_unended: bool = True  # unended samples (cut by max_new_tokens) still train (false: DAPO's overlong filter)
    # rloo: baselines average only the properly ended other samples (NeMo-Aligner); false: all of
    # them (TRL, OpenRLHF). With no ended other sample the advantage is 0.
    ended_baseline: bool = True
    # DAPO's dynamic sampling: up to this many draws of prompts per step until every group trained
    # on has samples that scored differently; 1: off
    max_draws: int = Field(1, ge=1)
    # DAPO's soft overlong penalty: over the last `overlong_buffer` tokens before max_new_tokens
    # the reward falls linearly by up to 1; 0: off
    overlong_buffer: int = Field(0, ge=0)
    # onpolicy_distill: "topk" the reverse KL over the teacher's top-K tokens at each visited
    # position (a local teacher); "sampled" the per-token estimate at the sampled token only,
    # trained as a policy gradient (what a teacher behind an API that scores given tokens allows)
    distill_loss: Literal["topk", "sampled"] = "topk"
    teacher_top_k: int = Field(64, ge=1)
    # stop once this many response tokens were generated (over all processes and draws), before
    # `steps`: methods that sample more per step (dynamic sampling) compared at one generation budget
    max_generated_tokens: int | None = Field(None, ge=1)


class TeacherServerConfig(Section):
    """A teacher behind an OpenAI-compatible completions endpoint that scores given tokens with
    vLLM's `prompt_logprobs` (vLLM, `alignkit serve generate`), serving the student's tokenizer."""

    url: str  # base URL ending in /v1
    model: str | None = None  # the name it serves
    concurrency: int = Field(4, ge=1)
    timeout_s: float = Field(120.0, gt=0.0)
    retries: int = Field(3, ge=0)
    api_key_env: str | None = "OPENAI_API_KEY"


class Config(RecipeConfig):
    data: DataConfig  # data.train: prompt records with "prompt"
    reward: RewardSourceConfig | None = None  # every estimator but onpolicy_distill learns from it
    # onpolicy_distill: the model whose log-probs the student matches, local or behind an endpoint
    teacher: ModelConfig | None = None
    teacher_server: TeacherServerConfig | None = None
    rollout: RolloutConfig = RolloutConfig()
    sampling: SamplingConfig = SamplingConfig(n=4)  # n samples per prompt: the group of the baselines
    reinforce: ReinforceConfig = ReinforceConfig()
    monitor: RewardSourceConfig | None = None  # scored on every rollout, never trained on (see ppo)
    distributed: DistributedConfig = DistributedConfig(strategy="ddp")
    placement: PlacementConfig = PlacementConfig()  # --launcher ray: generation engines of their own

    @model_validator(mode="after")
    def _sources(self) -> Config:
        estimator = self.reinforce.estimator
        if estimator in GROUP_ESTIMATORS and self.sampling.n < 2:
            raise ValueError(f"sampling.n={self.sampling.n}: {estimator} compares the samples of one prompt; use >= 2")
        if estimator == "onpolicy_distill" and (self.teacher is None) == (self.teacher_server is None):
            raise ValueError(
                "teacher: reinforce.estimator=onpolicy_distill needs one teacher: a local model (teacher.path) "
                "or an endpoint (teacher_server.url)"
            )
        remote_topk = self.teacher_server is not None and self.reinforce.distill_loss == "topk"
        if remote_topk and self.reinforce.teacher_top_k > 20:
            raise ValueError(
                f"reinforce.teacher_top_k={self.reinforce.teacher_top_k}: an endpoint returns at most 20 "
                "prompt log-probs per token (vLLM's default max_logprobs); use <= 20"
            )
        if estimator == "onpolicy_distill" and self.reinforce.distill_loss == "topk" and self.reinforce.kl_coef:
            raise ValueError("reinforce.kl_coef: on-policy distillation's teacher anchors the student; set it to 0")
        if estimator == "onpolicy_distill" and self.reinforce.max_draws > 1:
            raise ValueError(
                "reinforce.max_draws: dynamic sampling looks for reward variance; onpolicy_distill has none"
            )
        if self.rollout.overlap and self.reinforce.max_draws > 1:
            raise ValueError(
                "reinforce.max_draws: rollout.overlap draws each step once, ahead of it; dynamic sampling draws on"
            )
        if estimator != "onpolicy_distill" and self.reward is None:
            raise ValueError(f"reward: reinforce.estimator={estimator} learns from a reward source; set reward.kind")
        return self


def advantages(rf: ReinforceConfig, rewards: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
    """(G, n) per-response advantages from (G, n) rewards (RLOO: KL-penalised)."""
    if rf.estimator == "rloo":
        return rloo_advantages(rewards, ended if rf.ended_baseline else None)
    return grpo_advantages(rewards, scale=rf.scale_rewards)


def token_advantages(rf: ReinforceConfig, rollouts, scores: torch.Tensor, n: int, d) -> list[torch.Tensor]:
    """(R,) advantages per rollout. RLOO and GRPO: the response's advantage at each of its tokens.
    REINFORCE++: returns to go of the KL-shaped token rewards (k1 to the reference), minus the
    group's mean score in the -baseline variant, whitened over every token of the global batch."""
    if rf.estimator == "onpolicy_distill":  # the teacher's log-probs, filled in before
        return [reverse_kl_advantages(r.old_logps, r.teacher_logps) for r in rollouts]
    if not rf.estimator.startswith("reinforce_pp"):
        ended = torch.tensor([r.is_end for r in rollouts])
        adv = advantages(rf, scores.view(-1, n), ended.view(-1, n)).reshape(-1)
        return [torch.full((len(r.response_ids),), a) for r, a in zip(rollouts, adv.tolist())]
    baseline = scores.view(-1, n).mean(-1).repeat_interleave(n) if rf.estimator == "reinforce_pp_baseline" else None
    kl = [
        kl_per_token(r.old_logps, r.ref_logps, rf.kl_estimator or "k1")
        if rf.kl_coef
        else torch.zeros(len(r.response_ids))
        for r in rollouts
    ]
    returns = reinforce_pp_advantages(scores, kl, rf.kl_coef, baseline)
    flat = torch.cat(returns)
    whitened = whiten(flat, torch.ones_like(flat, dtype=torch.bool), global_moments(flat, torch.ones_like(flat), d))
    return list(whitened.split([len(r) for r in returns]))


def _loss_fn(rf: ReinforceConfig, teacher, kl_coef: float, kl_estimator: str) -> partial:
    """Step 4's loss: the policy-gradient surrogate, or (on-policy distillation, "topk") the reverse
    KL to the teacher over its top-K tokens at every visited position (`teacher` None: the top-K
    an endpoint returned, stored on the rollouts)."""
    if rf.estimator == "onpolicy_distill" and rf.distill_loss == "topk":
        return partial(reverse_kl_loss, teacher=teacher, top_k=rf.teacher_top_k)
    return partial(
        actor_loss,
        clip_eps=rf.clip_eps,
        clip_eps_high=rf.clip_eps_high,
        policy_loss=rf.policy_loss,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
    )


def _teacher_client(server: TeacherServerConfig) -> ChatClient:
    key = os.environ.get(server.api_key_env) if server.api_key_env else None
    return ChatClient(
        server.url, server.model, server.timeout_s, server.retries, server.concurrency, key, who="teacher"
    )


def main(cfg: Config) -> None:
    run = start_run(cfg)
    d, rf, rc = run.dist, cfg.reinforce, cfg.rollout
    check_processes(cfg, d)
    n = cfg.sampling.n
    estimator = rf.kl_estimator or ("k3" if rf.estimator == "grpo" else "k1")
    records = read_prompt_records(cfg.data.train.path, cfg.data.train.split, cfg.data.train.limit)
    reward = reward_source(cfg, d) if cfg.reward else None  # here, or on Ray ranks of its own
    monitor = build_reward_source(cfg.monitor, device=str(d.device)) if cfg.monitor else None
    tokenizer = load_tokenizer(cfg.model)
    pad_id, lora = tokenizer.pad_token_id, cfg.model.lora.enabled
    # prompts, seeds and sums go by data-parallel rank: a tensor-parallel group samples in lockstep
    actor = wrap_model(
        load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed), d, cfg.distributed, tensor_parallel=True
    )
    reference = None
    if rf.kl_coef and not lora:
        frozen = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed)
        reference = wrap_frozen(frozen, d, cfg.distributed, tensor_parallel=True)
    teacher = None
    if rf.estimator == "onpolicy_distill":  # scored with the student's tokenizer: they must share it
        teacher = load_causal_lm(cfg.teacher, tokenizer, seed=cfg.train.seed) if cfg.teacher else None
        teacher = teacher.to(d.device).requires_grad_(False) if teacher is not None else None
    remote = _teacher_client(cfg.teacher_server) if cfg.teacher_server else None
    distilling = teacher is not None or remote is not None
    optimizer = build_optimizer(actor, cfg.optim)
    parts = {"actor": (actor, optimizer, build_scheduler(optimizer, rf.steps * rf.epochs * rf.minibatches, cfg.optim))}
    start, extra, logger = resume(run, parts, rf.steps)
    generated = extra.get("generated_tokens", 0)  # response tokens sampled so far, every process
    # The old policy's log-probs matter only when the policy moves between updates of one rollout
    # batch, for the KL inside the reward (RLOO, REINFORCE++), or against the teacher's.
    kl_in_reward = rf.estimator in ("rloo", "reinforce_pp", "reinforce_pp_baseline") and rf.kl_coef > 0
    # vLLM: the trainer's recomputation is the old policy, and it measures the engine's gap (TIS).
    need_old = rf.epochs * rf.minibatches > 1 or kl_in_reward or distilling
    need_old = need_old or cfg.sampling.backend == "vllm" or rc.tis_cap is not None
    engine = rollout_engine(cfg, actor, tokenizer, d, run.autocast)  # after resume: the resumed weights
    run.log.info(f"{rf.estimator.upper()}: {rf.steps} steps of {rc.prompts_per_step} prompts x {n} samples")
    pool, ahead = (ThreadPoolExecutor(1, "draw-ahead") if rc.overlap else None), None

    for step in range(start, rf.steps):
        if rf.max_generated_tokens is not None and generated >= rf.max_generated_tokens:
            break  # (a resumed run that had already spent its budget)
        t0 = time.perf_counter()
        # --- 1-2. n samples per prompt (this process's share of the prompts), scored ---------------
        # (dynamic sampling: more prompts drawn until the groups trained on carry signal)
        rollouts, scores, t_generate, t_score, draws = sample_useful_groups(
            run, cfg, engine, tokenizer, records, reward, step, rf.max_draws, ahead
        )
        stale = ahead is not None  # drawn during the last update, from the weights before it
        if pool is not None and step + 1 < rf.steps:  # one step off-policy: the next draw starts now
            ahead = draw_ahead(pool, run, cfg, engine, tokenizer, records, reward, step + 1)
        if rf.overlong_buffer:
            lengths = torch.tensor([len(r.response_ids) for r in rollouts])
            penalty = overlong_penalty(lengths, cfg.sampling.max_new_tokens, rf.overlong_buffer)
            scores = scores + penalty
        t2 = time.perf_counter()

        # --- 3. log-probs where needed, then per-response advantages ---------------------------------
        plans, forward = update_plan(run, rollouts, rf.epochs, rf.minibatches, step, pad_id)
        if stale:  # the behaviour policy is the engine's: the ratio corrects for the step it lags
            for r in rollouts:
                r.old_logps = r.engine_logps
        elif need_old:
            for r, o in zip(rollouts, forward(lambda b: token_logps(actor, b)[0])):
                r.old_logps = o
        if rf.kl_coef:
            for r, ref in zip(rollouts, forward(reference_logps(actor, reference, lora))):
                r.ref_logps = ref
        if teacher is not None:
            for r, t in zip(rollouts, forward(lambda b: token_logps(teacher, b)[0])):
                r.teacher_logps = t
        if remote is not None:  # one request per 16 rollouts; the top-K kept for the "topk" loss
            k = rf.teacher_top_k if rf.distill_loss == "topk" else 1
            pairs = [(r.prompt_ids, r.response_ids) for r in rollouts]
            vocab = unwrap(actor).get_input_embeddings().num_embeddings
            for r, (logps, ids, tops) in zip(rollouts, teacher_scores(remote, pairs, k, vocab)):
                r.teacher_logps = logps
                if rf.distill_loss == "topk":
                    r.teacher_top_ids, r.teacher_top_logps = ids, tops
        t3 = time.perf_counter()
        rewards = scores.clone()
        if rf.estimator == "rloo" and rf.kl_coef:
            rewards -= rf.kl_coef * torch.tensor(
                [float(kl_per_token(r.old_logps, r.ref_logps, estimator).sum()) for r in rollouts]
            )
        weights, units = token_weights(
            torch.tensor([len(r.response_ids) for r in rollouts]), rf.loss_aggregation, cfg.sampling.max_new_tokens
        )
        for r, a, w, u in zip(rollouts, token_advantages(rf, rollouts, rewards, n, d), weights, units):
            r.advantages, r.weight = a, float(w)
            r.units = float(u) if rf.loss_aggregation != "token-mean" else None
            r.trains_actor = r.is_end or rf.train_unended
        adv = torch.stack([r.advantages.abs().max() if len(r.advantages) else torch.tensor(0.0) for r in rollouts])
        metrics = {**rollout_stats(rollouts, d), **monitor_stats(monitor, rollouts, d)}
        if not stale:  # (stale: the old log-probs are the engine's own)
            metrics.update(engine_gap(rollouts, rc.tis_cap, d))  # engine vs trainer log-probs; TIS weights
        metrics["rollout/staleness"] = float(stale)
        flat = reduce_sums(
            {
                "groups": len(rollouts) // n,
                "zero_var": float((scores.view(-1, n).std(-1) == 0).sum()) if n > 1 else 0.0,
                "adv_abs": float(sum(r.advantages.abs().mean() for r in rollouts if len(r.advantages))),
                "reward_kl": float(rewards.sum()),
                "drawn": draws.groups,
                "useful": draws.useful,
                "tokens": draws.tokens,
                "draws": draws.draws,
            },
            d,
        )
        metrics["rollout/zero_variance_groups"] = flat["zero_var"] / max(flat["groups"], 1)
        metrics["rollout/advantages_abs_mean"] = flat["adv_abs"] / metrics["rollout/samples"]
        # what generation bought: groups drawn (dynamic sampling discards the zero-variance ones),
        # and generated tokens per group that carried signal
        metrics["rollout/groups_drawn"] = flat["drawn"]
        metrics["rollout/groups_discarded"] = flat["drawn"] - flat["groups"]
        metrics["rollout/draws"] = flat["draws"] / d.dp_size
        metrics["rollout/tokens_per_useful_group"] = flat["tokens"] / max(flat["useful"], 1)
        if rf.overlong_buffer:
            metrics["rollout/overlong_penalty"] = (
                reduce_sums({"p": float(penalty.sum())}, d)["p"] / metrics["rollout/samples"]
            )
        if rf.estimator == "rloo" and rf.kl_coef:
            metrics["rollout/reward_with_kl"] = flat["reward_kl"] / metrics["rollout/samples"]
        if distilling:  # sum_t (log pi_student - log pi_teacher) per response: the sampled reverse KL
            tkl = reduce_sums({"kl": sum(float((r.old_logps - r.teacher_logps).sum()) for r in rollouts)}, d)
            metrics["rollout/teacher_kl"] = tkl["kl"] / metrics["rollout/samples"]

        # --- 4. clipped policy-gradient steps ----------------------------------------------------------
        kl_in_loss = 0.0 if kl_in_reward else rf.kl_coef
        loss_fn = _loss_fn(rf, teacher, kl_in_loss, estimator)
        # Without a KL term in the loss, a rollout with advantage 0 contributes exactly nothing.
        zero = not kl_in_loss and loss_fn.func is actor_loss
        skip = frozenset(i for i, a in enumerate(adv.tolist()) if a == 0.0) if zero else frozenset()
        lr = parts["actor"][2].get_last_lr()[0]
        sums, _, metrics["actor/grad_norm"] = train_epochs(
            run, parts["actor"], rollouts, plans, loss_fn, "actor_units", pad_id, skip
        )
        metrics.update(actor_metrics(sums, d))
        metrics["rollout/skipped_fraction"] = reduce_sums({"s": len(skip)}, d)["s"] / metrics["rollout/samples"]
        t4 = time.perf_counter()
        metrics.update(push_weights(engine, actor, ahead))  # the next step samples from the updated policy
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
        generated += int(flat["tokens"])
        metrics["rollout/generated_tokens_total"] = generated
        spent = rf.max_generated_tokens is not None and generated >= rf.max_generated_tokens
        finish_step(run, logger, step, metrics, parts, {"generated_tokens": generated}, step + 1 if spent else rf.steps)
        if spent:
            run.log.info(f"generation budget reached: {generated} tokens after {step + 1} steps")
            break
    if pool is not None:
        pool.shutdown()

    logger.close()
    if cfg.checkpoint.save_final:
        save_final(run, actor, tokenizer)
