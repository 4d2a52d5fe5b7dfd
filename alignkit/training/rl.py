"""The RL core: what every online recipe (`ppo`, `reinforce`) shares, as plain functions the recipes
call in the order of their algorithm box.

    sample_and_score    steps 1-2: this process's share of the step's prompts, sampled and scored
    reference_logps     the reference policy's per-token log-probs (a frozen copy, or adapters off)
    global_moments      whitening statistics over every process's tokens (`mean_std` reads them)
    actor_loss          the clipped surrogate (+ entropy bonus, + GRPO's KL term)
    critic_loss         the clipped value loss
    train_epochs        every epoch's minibatches, one optimizer step each (`train_on`)
    rollout_stats, monitor_stats, actor_metrics    the shared `rollout/` and `actor/` metrics
    engine_gap          engine vs trainer log-probs of the sampled tokens; TIS weights from them

Below this sits `training/rollouts.py` (the sampling loop, packing and per-token forward passes);
above it, the recipes. Sampling is configured by the recipe's `sampling` section
(`alignkit.config.SamplingConfig`, whose `backend` picks the engine the recipe builds once and
updates after each policy step); which prompts a step uses by `rollout.prompts_per_step`.
"""

from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from pydantic import Field

from alignkit.config import ConfigError, SamplingConfig, Section
from alignkit.data.io import DataError, Record
from alignkit.data.tokenize import IGNORE
from alignkit.generation.batches import sample_batches
from alignkit.generation.engine import Engine
from alignkit.losses.distill import topk_kd_loss
from alignkit.losses.policy_gradient import (
    cispo_policy_loss,
    gspo_policy_loss,
    kl_per_token,
    masked_moments,
    ppo_policy_loss,
    value_loss,
)
from alignkit.models.forward import logits_at
from alignkit.models.loading import adapters_off
from alignkit.models.reward import RewardModelInfo
from alignkit.training.distributed import Dist, all_reduce_sum
from alignkit.training.loop import Run, optimizer_step, reduce_metrics
from alignkit.training.rollouts import (
    Rollout,
    collate_rollouts,
    epoch_plan,
    forward_rollouts,
    reduce_sums,
    render_prompts,
    step_prompts,
    token_logps,
    token_values,
)

__all__ = [
    "RolloutConfig",
    "actor_loss",
    "actor_metrics",
    "check_processes",
    "critic_loss",
    "engine_gap",
    "reverse_kl_loss",
    "global_moments",
    "mean_std",
    "monitor_stats",
    "reference_logps",
    "rollout_stats",
    "sample_and_score",
    "sample_rollouts",
    "train_epochs",
    "Draws",
    "draw_ahead",
    "push_weights",
    "sample_useful_groups",
    "train_on",
    "update_plan",
]


class RolloutConfig(Section):
    prompts_per_step: int = Field(16, ge=1)  # prompts per RL step, over all processes
    # Truncated importance sampling (Yao et al. 2025): the engine that sampled (vLLM, bf16) is not
    # exactly the policy trained; weight each token's policy loss by min(pi_train / pi_engine, C).
    # None: off. Needs the engine's log-probs (every backend reports them).
    tis_cap: float | None = Field(None, gt=0.0)
    # One-step off-policy (veRL's one_step_off): step s+1's samples are drawn, on generation actors
    # of their own (`placement.generator.ranks`), while step s trains, from the weights before its
    # update; the importance ratio is taken against the engine's log-probs of the samples.
    overlap: bool = False


def check_processes(cfg, d: Dist) -> None:
    """Every data-parallel rank gets the same number of prompts, so all run the same collectives
    (FSDP: the same forwards; generation itself gathers the whole model first and runs without
    any). A tensor-parallel group shares its prompts and seeds: its ranks sample the same tokens in
    lockstep, each forward's all-reduces among them."""
    if cfg.rollout.prompts_per_step % d.dp_size:
        shown = f"{d.dp_size} data-parallel groups of {d.tp}" if d.tp > 1 else str(d.world_size)
        raise ConfigError(
            f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must divide by the number of processes ({shown})"
        )


# --- 1-2. sample and score ------------------------------------------------------------------------


def sample_rollouts(
    engine: Engine,
    tokenizer,
    records: list[Record],
    indices: list[int],
    sampling: SamplingConfig,
    max_seq_len: int,
    seed: int,
    chat_template: str | None,
) -> list[Rollout]:
    """`sampling.n` responses to each record in `indices`, sampled by `engine`; the batch starting at
    offset `start` of `indices` samples with seed `seed + start`. A prompt that leaves no room for `max_new_tokens`
    within `max_seq_len` is an error naming its record, not a silently truncated rollout."""
    chosen = [records[i] for i in indices]
    prompt_ids = render_prompts(tokenizer, chosen, chat_template)
    for record, ids in zip(chosen, prompt_ids):
        if len(ids) + sampling.max_new_tokens > max_seq_len:
            raise DataError(
                f"{record.source}: the prompt is {len(ids)} tokens; with sampling.max_new_tokens="
                f"{sampling.max_new_tokens} it exceeds data.max_seq_len={max_seq_len}"
            )
    rollouts: list[Rollout] = []
    for start, completions in sample_batches(engine, prompt_ids, sampling, lambda s: seed + s):
        for c in completions:
            p = start + c.prompt_index  # the prompt's offset among this process's prompts: its group
            rollout = Rollout(chosen[p].data, p, prompt_ids[p], c.token_ids, c.text, c.is_end)
            rollout.engine_logps = torch.tensor(c.logprobs, dtype=torch.float32)  # (R,)
            rollouts.append(rollout)
    return rollouts


def sample_and_score(run: Run, cfg, engine: Engine, tokenizer, records: list[Record], reward, step: int, draw: int = 0):
    """Steps 1-2 of every RL recipe: this process's share of step `step`'s prompts, sampled
    (`sampling.n` each, by `engine`) and scored. Seeds derive from (`sampling.seed`, else `train.seed`), the step
    and the rank; `draw` > 0 (dynamic sampling's extra draws) takes other prompts and seeds.
    Returns (rollouts with `score` set, (B,) scores, generation seconds, scoring seconds)."""
    d = run.dist
    t0 = time.perf_counter()
    order_seed = cfg.train.seed + 104_729 * draw
    indices = step_prompts(len(records), step, cfg.rollout.prompts_per_step, order_seed)[d.dp_rank :: d.dp_size]
    base = cfg.train.seed if cfg.sampling.seed is None else cfg.sampling.seed
    seed = base + 1_000_003 * (step + 1) + 10_007 * d.dp_rank + 7_919 * draw
    rollouts = sample_rollouts(
        engine, tokenizer, records, indices, cfg.sampling, cfg.data.max_seq_len, seed, cfg.data.chat_template
    )
    t1 = time.perf_counter()
    if reward is None:  # a recipe that learns from something else (on-policy distillation's teacher)
        scores = torch.zeros(len(rollouts))
    else:
        scores = reward([r.prompt for r in rollouts], [r.text for r in rollouts]).rewards.float()  # (B,)
    for r, score in zip(rollouts, scores.tolist()):
        r.score = score
    return rollouts, scores, t1 - t0, time.perf_counter() - t1


# --- 3. per-token passes and advantage statistics ---------------------------------------------------


@dataclass
class Draws:
    """What dynamic sampling drew in one step (this process): groups sampled, groups kept that
    carry signal (their samples scored differently), draws made, tokens generated."""

    groups: int = 0
    useful: int = 0
    draws: int = 0
    tokens: int = 0


def draw_ahead(pool, run: Run, cfg, engine: Engine, tokenizer, records: list[Record], reward, step: int) -> Future:
    """One-step off-policy: step `step`'s samples (`sample_and_score`, no collectives), drawn in a
    thread of `pool` while the previous step trains. Wait for it before the weights change."""
    return pool.submit(sample_and_score, run, cfg, engine, tokenizer, records, reward, step)


def push_weights(engine: Engine, actor, ahead: Future | None) -> dict[str, float]:
    """After the update: wait for the draw ahead (it ends on the weights it started with), then
    push the actor's new weights into the engine. Returns the seconds of each (`timing/`)."""
    t0 = time.perf_counter()
    if ahead is not None:
        wait([ahead])
    t1 = time.perf_counter()
    engine.update_weights(actor)
    return {"timing/ahead_wait_s": t1 - t0, "timing/weight_sync_s": time.perf_counter() - t1}


def sample_useful_groups(
    run: Run,
    cfg,
    engine: Engine,
    tokenizer,
    records: list[Record],
    reward,
    step: int,
    max_draws: int,
    ahead: Future | None = None,
) -> tuple[list[Rollout], torch.Tensor, float, float, Draws]:
    """DAPO's dynamic sampling: draw the step's prompts, then more (up to `max_draws` draws in all)
    until every process holds its share of groups whose samples did not all score the same
    (an all-right or all-wrong group has zero advantage everywhere: no gradient, generation paid
    for nothing). The step trains on that share: useful groups first, topped up with zero-variance
    ones only if the draws ran out (so every process runs the same number of passes). Returns what
    `sample_and_score` does, for the kept groups, and the `Draws`. `ahead`: the one draw made
    during the previous step's update (one-step off-policy); the generation time is the wait for it."""
    n, share = cfg.sampling.n, cfg.rollout.prompts_per_step // run.dist.dp_size
    useful: list[list[Rollout]] = []
    idle: list[list[Rollout]] = []
    stats, t_generate, t_score = Draws(), 0.0, 0.0
    for draw in range(max_draws):
        if ahead is not None:
            t0 = time.perf_counter()
            rollouts, scores, _, ts = ahead.result()
            tg = time.perf_counter() - t0
        else:
            rollouts, scores, tg, ts = sample_and_score(run, cfg, engine, tokenizer, records, reward, step, draw)
        t_generate, t_score = t_generate + tg, t_score + ts
        for g in range(len(rollouts) // n):
            group = rollouts[g * n : (g + 1) * n]
            varies = n > 1 and bool(scores[g * n : (g + 1) * n].std() > 0)  # (one sample: no variance to find)
            (useful if varies else idle).append(group)
        stats.draws, stats.groups = draw + 1, stats.groups + len(rollouts) // n
        stats.tokens += sum(len(r.response_ids) for r in rollouts)
        if reduce_sums({"short": float(len(useful) < share)}, run.dist)["short"] == 0:
            break
    kept = (useful + idle)[:share]
    stats.useful = min(len(useful), share)
    flat = [r for group in kept for r in group]
    for i, r in enumerate(flat):
        r.group = i // n  # renumbered: groups are the kept ones, in order
    return flat, torch.tensor([r.score for r in flat]), t_generate, t_score, stats


def update_plan(run: Run, rollouts: list[Rollout], epochs: int, minibatches: int, step: int, pad_id: int):
    """The step's update plan: per epoch a seeded shuffle into `minibatches` minibatches of
    micro-batches (`epoch_plan`), and `forward(fn) -> per-rollout (R,) tensors`, the no-grad pass of
    `fn(batch) -> (N,)` over the FIRST epoch's micro-batches. Old log-probs computed on the same
    micro-batches as the first update make its ratio exactly 1 (same inputs, shapes and kernels)."""
    seed = run.cfg.train.seed + epochs * step
    plans = [epoch_plan(len(rollouts), minibatches, run.cfg.train.micro_batch_size, seed + e) for e in range(epochs)]
    forward = partial(
        forward_rollouts,
        rollouts=rollouts,
        micro_batches=[mb for minibatch in plans[0] for mb in minibatch],
        pad_id=pad_id,
        device=run.dist.device,
        autocast=run.autocast,
    )
    return plans, forward


def reference_logps(actor, reference, lora: bool):
    """fn(batch) -> (N,) log-probs under the reference (a frozen copy, or the actor without adapters)."""

    def fn(batch):
        with adapters_off(actor, lora) if reference is None else contextlib.nullcontext():
            return token_logps(reference if reference is not None else actor, batch)[0]

    return fn


def global_moments(x: torch.Tensor, mask: torch.Tensor, d: Dist) -> torch.Tensor:
    """(3,) [sum, sum of squares, count] of (B, T) x over the mask and over every process."""
    return all_reduce_sum(masked_moments(x, mask), d)


def mean_std(moments: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) std from `global_moments`."""
    total, total_sq, count = moments.tolist()
    mean = total / max(count, 1.0)
    return mean, math.sqrt(max(total_sq / max(count, 1.0) - mean**2, 0.0))


# --- 4-5. losses and update epochs ------------------------------------------------------------------


def actor_loss(
    model,
    batch,
    clip_eps: float,
    entropy_coef: float = 0.0,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    policy_loss: str = "ppo",
    clip_eps_high: float | None = None,
):
    """The policy loss over the tokens of `actor_mask` (`policy_loss`: "ppo" the clipped surrogate,
    "gspo" its sequence-ratio form, "cispo" REINFORCE with clipped detached weights), each token
    weighted by its rollout's aggregation weight, minus `entropy_coef` x entropy, plus `kl_coef` x
    the per-token KL to the reference (GRPO's KL term; PPO puts its KL in the reward). Without
    `old_logps` in the batch (a single update per rollout) the old policy is the current one: ratio
    1, and the gradient is the same, at no extra forward pass. Sums over tokens."""
    logps, entropy = token_logps(model, batch, entropy="grad" if entropy_coef else "detached")  # (N,)
    old = batch["old_logps"] if "old_logps" in batch else logps.detach()
    mask, weights, adv = batch["actor_mask"], batch.get("loss_weights"), batch["advantages"]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    w_pg = weights
    if "tis_weights" in batch:  # (N,) truncated importance weights scale the policy-gradient term only
        w_pg = batch["tis_weights"] if weights is None else weights * batch["tis_weights"]
    if policy_loss == "gspo":
        lengths = torch.tensor(batch["response_lengths"], device=logps.device)
        loss, metrics = gspo_policy_loss(logps, old, adv, mask, lengths, clip_eps, high, w_pg)
    elif policy_loss == "cispo":
        loss, metrics = cispo_policy_loss(logps, old, adv, mask, high, w_pg)
    else:
        loss, metrics = ppo_policy_loss(logps, old, adv, mask, clip_eps, high, w_pg)
    m = mask.to(logps.dtype)
    w = m if weights is None else m * weights  # the aggregation's weight of each token
    if entropy_coef:
        loss = loss - entropy_coef * (entropy * w).sum()
    metrics["entropy"] = (entropy.detach() * m).sum()
    if kl_coef:
        kl = kl_per_token(logps, batch["ref_logps"], kl_estimator)
        loss = loss + kl_coef * (kl * w).sum()
        metrics["kl_loss"] = (kl.detach() * m).sum()
    metrics["loss"] = loss.detach()
    return loss, metrics


def reverse_kl_loss(model, batch, teacher, top_k: int):
    """On-policy distillation (GKD with beta = 1, Agarwal et al. 2024): at each position the
    student's own samples visited, the reverse KL(student || teacher) over the teacher's `top_k`
    most likely tokens (both renormalised there, as the offline `distill` recipe's loss),
    differentiated through the student's distribution, not through the sampling. A local teacher
    runs a no-grad forward per micro-batch; `teacher=None` reads the top-K an endpoint returned for
    each rollout (`teacher_top_ids`, `teacher_top_logps`). Sums over the tokens of `actor_mask`,
    each weighted by its rollout's aggregation weight."""
    select = batch["target_ids"] != IGNORE  # (B, T)
    student = logits_at(model, batch["input_ids"], batch["position_ids"], select).float()  # (N, V)
    if teacher is None:  # renormalised over the K, log-probs and logits give the same loss
        top, ids = batch["teacher_top_logps"].to(student.device), batch["teacher_top_ids"].to(student.device)
    else:
        with torch.no_grad():
            teacher_logits = logits_at(teacher, batch["input_ids"], batch["position_ids"], select).float()
            top, ids = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1)  # (N, K)
    per_token = topk_kd_loss(student, top, ids, kl="reverse")  # (N,)
    m = batch["actor_mask"].to(per_token.dtype)
    w = m if batch.get("loss_weights") is None else m * batch["loss_weights"]
    loss = (per_token * w).sum()
    metrics = {"reverse_kl": (per_token.detach() * m).sum(), "tokens": m.sum(), "loss": loss.detach()}
    return loss, metrics


def critic_loss(model, batch, info: RewardModelInfo, normalize: bool, clip: float | None):
    values = token_values(model, batch, info, normalize)  # (N,)
    return value_loss(values, batch["values"], batch["returns"], batch["response_mask"], clip)


def train_on(
    run: Run,
    model,
    optimizer,
    scheduler,
    rollouts: list[Rollout],
    minibatch: list[list[int]],
    loss_fn,
    units: str,
    pad_id: int,
    skip: frozenset[int] = frozenset(),
) -> tuple[dict, float, float]:
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
        counted = [rollouts[i] for i in mb if units == "num_units" or rollouts[i].trains_actor]
        batch["num_units"] = sum(_units(r, units) for r in counted)
        batches.append(batch)
    sums, global_units, _, grad_norm = optimizer_step(run, model, optimizer, batches, loss_fn)
    scheduler.step()
    return sums, global_units, grad_norm


def _units(rollout: Rollout, units: str) -> float:
    """What a rollout adds to the normaliser: its tokens, or (actor, with a loss aggregation
    other than a token mean) the units its aggregation gives it."""
    if units == "num_units" or rollout.units is None:
        return len(rollout.response_ids)
    return rollout.units


def train_epochs(
    run: Run,
    part: tuple,
    rollouts: list[Rollout],
    plans: list,
    loss_fn,
    units: str,
    pad_id: int,
    skip: frozenset[int] = frozenset(),
) -> tuple[dict, float, float]:
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


# --- metrics -------------------------------------------------------------------------------------------


def actor_metrics(sums: dict, d: Dist) -> dict[str, float]:
    """`actor/*` means over the tokens the updates computed (global)."""
    totals = reduce_metrics(sums, 1.0, d)
    tokens = max(totals.pop("tokens", 0.0), 1.0)
    return {f"actor/{k}": v / tokens for k, v in totals.items()}


def rollout_stats(rollouts: list[Rollout], d: Dist) -> dict[str, float]:
    """Global means over every process's rollouts: reward, response length, ended fraction, and
    (when reference log-probs are there) kl = sum_t (log pi_old - log pi_ref) per response."""
    sums = {
        "n": len(rollouts),
        "reward": sum(r.score for r in rollouts),
        "tokens": sum(len(r.response_ids) for r in rollouts),
        "ended": sum(r.is_end for r in rollouts),
    }
    if rollouts and rollouts[0].ref_logps is not None and rollouts[0].old_logps is not None:
        sums["kl"] = sum(float((r.old_logps - r.ref_logps).sum()) for r in rollouts)
    g = reduce_sums(sums, d)
    n = max(g.pop("n"), 1.0)
    out = {
        "rollout/reward": g["reward"] / n,
        "rollout/response_tokens": g["tokens"] / n,
        "rollout/ended_fraction": g["ended"] / n,
        "rollout/samples": n,
    }
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


def engine_gap(rollouts: list[Rollout], tis_cap: float | None, d: Dist) -> dict[str, float]:
    """How far the engine that sampled is from the policy trained: |log pi_engine - log pi_train|
    of every sampled token (the trainer's recomputation in `old_logps`), its mean over every
    process's tokens and its max (`rollout/logprob_abs_diff_mean`, `_max`). With `tis_cap` C, sets
    each rollout's (R,) `tis_weights` = min(pi_train / pi_engine, C). Needs `old_logps`."""
    if not rollouts or rollouts[0].engine_logps is None or rollouts[0].old_logps is None:
        return {}
    gaps = [(r.old_logps - r.engine_logps).abs() for r in rollouts]  # (R,) each
    g = reduce_sums({"sum": float(sum(x.sum() for x in gaps)), "n": sum(len(x) for x in gaps)}, d)
    largest = torch.tensor([max((float(x.max()) for x in gaps if len(x)), default=0.0)], device=_reduce_device(d))
    if d.enabled:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    if tis_cap is not None:
        for r in rollouts:
            r.tis_weights = torch.exp(r.old_logps - r.engine_logps).clamp(max=tis_cap)
    return {
        "rollout/logprob_abs_diff_mean": g["sum"] / max(g["n"], 1.0),
        "rollout/logprob_abs_diff_max": float(largest),
    }


def _reduce_device(d: Dist) -> torch.device:
    """NCCL reduces GPU tensors only; gloo, CPU ones."""
    return d.device if d.enabled and d.device.type == "cuda" else torch.device("cpu")
