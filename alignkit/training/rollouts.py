"""Samples from the policy and the per-token passes over them: the lower piece of every recipe that
learns from its own samples, which it draws with `alignkit.generation.batches.sample_batches` (the
one sampling loop of every recipe, eval and `alignkit generate`). The RL core on top
(`training/rl.py`) turns the samples into `Rollout`s, scores them and trains on them.

A `Rollout` is one sampled response with its per-token tensors, all (R,) over the R response
tokens (EOS included, as sampled): old log-probs (the actor at sampling time), reference
log-probs, critic values, advantages and returns. Forward passes pack rollouts into rows
(`collate_groups`: little padding) and compute logits only at response positions (`logits_at`);
per-token results come back as one flat (N,) tensor in packed order and are split per rollout.

Exactness the recipes rely on: the no-grad passes that fill `old_logps` (and the reference and
values) use the same micro-batches as the first PPO epoch, so at the first minibatch of the first
epoch the policy ratio is exactly 1 (same inputs, same shapes, same kernels).

Distribution: each step's prompts are split over processes (`prompts_per_step` must divide by the
number of processes, so every process runs the same number of forward passes); the samples of a
prompt stay on one process, so group baselines (RLOO, GRPO) are local and exact. Generation runs
on the unwrapped module, which is why the RL recipes use DDP, not FSDP, across processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alignkit.data.batching import collate_groups
from alignkit.data.formats import prompt_messages, with_system_prompt
from alignkit.data.io import Record
from alignkit.data.tokenize import IGNORE, Example, render_chat
from alignkit.generation.batches import sample_batches
from alignkit.models.forward import logits_at
from alignkit.models.reward import RewardModelInfo, sequence_scores
from alignkit.training.distributed import all_reduce_sum
from alignkit.training.loop import to_device

__all__ = [
    "Rollout",
    "collate_rollouts",
    "epoch_plan",
    "forward_rollouts",
    "pad",
    "reduce_sums",
    "render_prompts",
    "sample_batches",
    "step_prompts",
    "token_logps",
    "token_values",
    "unpad",
]

Tensor = torch.Tensor


@dataclass
class Rollout:
    prompt: Any  # the prompt record, for the reward source
    group: int  # the prompt's index among this process's prompts of the step: samples of one prompt share it
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    is_end: bool  # ended by EOS or a stop string, not by max_new_tokens
    score: float = 0.0
    old_logps: Tensor | None = None  # (R,) the actor at sampling time
    engine_logps: Tensor | None = None  # (R,) what the sampling engine reported (vLLM: not the trainer's numerics)
    tis_weights: Tensor | None = None  # (R,) truncated importance weights min(pi_train / pi_engine, C)
    ref_logps: Tensor | None = None  # (R,) the reference
    teacher_logps: Tensor | None = None  # (R,) a teacher (on-policy distillation)
    # a teacher behind an endpoint: its top-K tokens and log-probs at each response position
    teacher_top_ids: Tensor | None = None  # (R, K)
    teacher_top_logps: Tensor | None = None  # (R, K)
    values: Tensor | None = None  # (R,) the critic at sampling time
    advantages: Tensor | None = None  # (R,)
    returns: Tensor | None = None  # (R,)
    trains_actor: bool = True  # in the actor loss (unended rollouts may be left out)
    # the loss aggregation (`losses.policy_gradient.token_weights`): each token's weight, and the
    # units this rollout adds to the normaliser (None: its token count, a plain token mean)
    weight: float = 1.0
    units: float | None = None

    def example(self) -> Example:
        """[prompt | response] with shifted targets on the response tokens."""
        ids = self.prompt_ids + self.response_ids
        return Example(ids, [IGNORE] * (len(self.prompt_ids) - 1) + self.response_ids + [IGNORE], "rollout")


# --- which prompts, and sampling ----------------------------------------------------------------


def step_prompts(num_records: int, step: int, per_step: int, seed: int) -> list[int]:
    """The record indices of step `step` (0-based): consecutive slices of seeded permutations,
    a new permutation per pass over the records, so a resumed run sees the same prompts."""
    out, permutations = [], {}
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, num_records)
        if epoch not in permutations:
            permutations[epoch] = np.random.default_rng(seed + epoch).permutation(num_records)
        out.append(int(permutations[epoch][offset]))
    return out


def render_prompts(
    tokenizer, records: Sequence[Record], chat_template: str | None, system_prompt: str | None = None
) -> list[list[int]]:
    """(P) token ids of each record's prompt conversation (`prompt_messages`, with `system_prompt`
    first where it has none), rendered by the chat template up to the assistant's turn."""
    texts = [
        render_chat(
            tokenizer,
            with_system_prompt(prompt_messages(r), system_prompt),
            chat_template,
            r.source,
            add_generation_prompt=True,
        )
        for r in records
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# --- forward passes over rollouts ---------------------------------------------------------------


def collate_rollouts(rollouts: list[Rollout], pad_id: int) -> dict[str, Any]:
    """A micro-batch: the rollouts packed into rows, and their per-token tensors concatenated in
    packed order (the order of `logits_at`'s positions). `order` maps packed position -> index in
    `rollouts`; `actor_tokens` counts the tokens of rollouts in the actor loss, `num_tokens` all."""
    batch = collate_groups([[r.example()] for r in rollouts], pad_id)
    packed = [rollouts[i] for i in batch["order"]]
    batch["response_lengths"] = [len(r.response_ids) for r in packed]
    for key in ("old_logps", "ref_logps", "values", "advantages", "returns", "teacher_top_ids", "teacher_top_logps"):
        if all(getattr(r, key) is not None for r in packed):
            batch[key] = torch.cat([getattr(r, key) for r in packed])
    if all(r.tis_weights is not None for r in packed):
        batch["tis_weights"] = torch.cat([r.tis_weights for r in packed])
    batch["actor_mask"] = torch.cat([torch.full((len(r.response_ids),), r.trains_actor) for r in packed])
    batch["response_mask"] = torch.ones_like(batch["actor_mask"])
    batch["actor_tokens"] = int(batch["actor_mask"].sum())
    if any(r.weight != 1.0 for r in packed):
        batch["loss_weights"] = torch.cat([torch.full((len(r.response_ids),), r.weight) for r in packed])
    return batch


def token_logps(model, batch, entropy: str | None = None) -> tuple[Tensor, Tensor | None]:
    """(N,) log-probs of the response tokens, and (N,) the policy's entropy at each: `entropy`
    "grad" (for an entropy bonus), "detached" (to log it: no graph, no backward cost) or None."""
    select = batch["target_ids"] != IGNORE  # (B, T)
    logits = logits_at(model, batch["input_ids"], batch["position_ids"], select).float()  # (N, V)
    log_probs = logits.log_softmax(-1)
    logps = log_probs.gather(-1, batch["target_ids"][select][:, None]).squeeze(-1)
    if entropy is None:
        return logps, None
    with torch.no_grad() if entropy == "detached" else contextlib.nullcontext():
        return logps, -(log_probs.exp() * log_probs).sum(-1)


def token_values(critic, batch, info: RewardModelInfo, normalize: bool = False) -> Tensor:
    """(N,) the critic's value of the state before each response token: the head's scalar reward
    (w . a for a multi-attribute head, standardised like the reward source if `normalize`) at the
    position that predicts the token."""
    select = batch["target_ids"] != IGNORE
    scores = sequence_scores(critic, batch["input_ids"], batch["position_ids"], select)  # (N, A)
    return info.reward(scores, normalize)


@torch.no_grad()
def forward_rollouts(
    fn: Callable[[dict[str, Any]], Tensor],
    rollouts: list[Rollout],
    micro_batches: list[list[int]],
    pad_id: int,
    device,
    autocast=contextlib.nullcontext,
) -> list[Tensor]:
    """Per-token results (R,) of `fn(batch) -> (N,)` for every rollout, in rollout order, computed
    over `micro_batches` (lists of rollout indices)."""
    out: list[Tensor | None] = [None] * len(rollouts)
    for mb in micro_batches:
        batch = collate_rollouts([rollouts[i] for i in mb], pad_id)
        with autocast():
            flat = fn(to_device(batch, device)).float().cpu()
        for j, piece in zip(batch["order"], flat.split(batch["response_lengths"])):
            out[mb[j]] = piece
    return out  # type: ignore[return-value]


def epoch_plan(num_rollouts: int, minibatches: int, micro_batch_size: int, seed: int) -> list[list[list[int]]]:
    """One PPO epoch: a seeded shuffle of this process's rollouts, split into `minibatches`
    minibatches (one optimizer step each) of micro-batches of `micro_batch_size` rollouts."""
    order = np.random.default_rng(seed).permutation(num_rollouts).tolist()
    size = -(-num_rollouts // minibatches)
    minis = [order[i : i + size] for i in range(0, num_rollouts, size)]
    return [[mini[j : j + micro_batch_size] for j in range(0, len(mini), micro_batch_size)] for mini in minis]


# --- per-token tensors <-> padded (B, T) ------------------------------------------------------------


def pad(pieces: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(B, T) right-padded values and the (B, T) bool mask of real tokens."""
    lengths = torch.tensor([len(p) for p in pieces])
    mask = torch.arange(max((len(p) for p in pieces), default=0))[None, :] < lengths[:, None]
    return torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True), mask


def unpad(padded: Tensor, mask: Tensor) -> list[Tensor]:
    return [row[m] for row, m in zip(padded, mask)]


def reduce_sums(sums: dict[str, float], d) -> dict[str, float]:
    """Sum each statistic over data-parallel ranks (one all-reduce; the ranks of a tensor-parallel
    group hold the same rollouts, counted once)."""
    keys = sorted(sums)
    packed = all_reduce_sum(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64), d) / d.tp
    return dict(zip(keys, packed.tolist()))
