"""On-policy preference pairs: a model answers every prompt n times, a judge scores the answers,
and the best and the worst answer to a prompt become a (chosen, rejected) pair; prompts whose
answers all score within `min_margin` of each other give none. With `all_pairs`, every comparison
among a prompt's answers that clears the margin (InstructGPT's K-choose-2: more data for a reward
model, which learns from each comparison; DPO keeps best-vs-worst).

Pairs from the policy's own distribution teach what the policy actually gets wrong, where pairs
from another writer mostly teach that writer's style: the usual finding that on-policy preference
data beats off-policy data for DPO. Used by the `dpo` recipe's online mode and by the demo's
reward-model stage.

An answer cut by `max_new_tokens` (not ended by EOS or a stop string) scores 0 without asking the
judge: a truncated answer is never the better one.

Sampling is deterministic and does not depend on the number of processes: the prompts are sorted
by length (less padding), cut into batches of `sampling.batch_size` prompts x `sampling.n` rows, and
each batch is seeded with `sampling.seed` + its first row. Under torchrun process r samples
batches r, r + W, ...; the pairs are gathered in prompt order on every process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from alignkit.config import SamplingConfig
from alignkit.data.io import Record
from alignkit.generation.batches import sample_batches
from alignkit.generation.engine import build_engine
from alignkit.generation.sampler import Completion
from alignkit.tasks.datasets import MIN_PREFERENCE_MARGIN, best_worst_pair, ranked_pairs
from alignkit.training.distributed import Dist, gather_rollouts
from alignkit.training.rollouts import render_prompts

__all__ = ["Judge", "sampled_preference_pairs"]

# (prompt records' data, responses) -> one reward per response, as Python floats
Judge = Callable[[list[dict[str, Any]], list[str]], list[float]]
Scored = list[tuple[float, str]]  # one prompt's answers: (reward, text), in sample order


class _Group(NamedTuple):
    """One prompt's judged answers (what the processes exchange)."""

    index: int  # the prompt's position in `prompts`
    scored: Scored
    tokens: int  # response tokens over its answers
    ended: int  # answers ended by EOS or a stop string


def sampled_preference_pairs(
    model,
    tokenizer,
    prompts: Sequence[Record],
    sampling: SamplingConfig,
    judge: Judge,
    all_pairs: bool = False,
    min_margin: float = MIN_PREFERENCE_MARGIN,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    d: Dist | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Pair records {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin"}
    in prompt order, and rollout metrics (`rollout/reward`, `rollout/ended_fraction`,
    `rollout/response_tokens`, `rollout/pairs`, `rollout/margin`). The caller chooses the precision
    (autocast or not) around this call."""
    if sampling.n < 2:
        raise ValueError(f"sampling.n={sampling.n}: a preference pair needs at least 2 answers per prompt")
    ids = render_prompts(tokenizer, prompts, chat_template, system_prompt)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # stable
    size, n = sampling.batch_size, sampling.n
    rank, world = (d.rank, d.world_size) if d is not None else (0, 1)
    # This process's batches b = rank, rank + W, ... back to back: every batch but the globally last
    # is full, so the shared loop cuts them at the same places; batch b is seeded seed + b * size * n.
    mine_order = [i for b in range(rank, -(-len(order) // size), world) for i in order[b * size : (b + 1) * size]]

    def seed_of(start: int) -> int | None:
        return None if sampling.seed is None else sampling.seed + (rank + start // size * world) * size * n

    mine: list[_Group] = []
    engine = build_engine(model, tokenizer, sampling)
    for start, completions in sample_batches(engine, [ids[i] for i in mine_order], sampling, seed_of):
        mine += _judged(prompts, mine_order[start : start + size], completions, n, judge)
    if d is not None:
        mine, _ = gather_rollouts(mine, {}, d)
    groups = sorted(mine, key=lambda g: g.index)  # prompt order
    pairs = [pair for g in groups for pair in _pairs(_prompt_value(prompts[g.index]), g.scored, all_pairs, min_margin)]
    return pairs, _metrics(groups, pairs)


def _judged(
    prompts: Sequence[Record], batch: list[int], completions: list[Completion], n: int, judge: Judge
) -> list[_Group]:
    """Each prompt of the batch with its n judged answers (completion k * n + j: answer j to
    prompt batch[k])."""
    rewards = [0.0] * len(completions)
    ended = [k for k, c in enumerate(completions) if c.is_end]
    if ended:
        judged = judge(
            [prompts[batch[completions[k].prompt_index]].data for k in ended], [completions[k].text for k in ended]
        )
        for k, reward in zip(ended, judged, strict=True):
            rewards[k] = reward
    groups = []
    for k, i in enumerate(batch):
        answers = completions[k * n : (k + 1) * n]
        groups.append(
            _Group(
                i,
                [(r, c.text) for r, c in zip(rewards[k * n : (k + 1) * n], answers)],
                sum(len(c.token_ids) for c in answers),
                sum(c.is_end for c in answers),
            )
        )
    return groups


def _prompt_value(record: Record) -> Any:
    """What a pair record's "prompt" holds: the prompt as the record gives it (text or messages)."""
    return record.data["prompt"] if "prompt" in record.data else record.data["messages"]


def _pairs(prompt: Any, scored: Scored, all_pairs: bool, min_margin: float) -> list[dict[str, Any]]:
    if all_pairs:
        return ranked_pairs(prompt, scored, min_margin)
    pair = best_worst_pair(prompt, scored, min_margin)
    return [] if pair is None else [pair]


def _metrics(groups: list[_Group], pairs: list[dict[str, Any]]) -> dict[str, float]:
    rewards = [reward for g in groups for reward, _ in g.scored]
    samples = max(len(rewards), 1)
    return {
        "rollout/reward": sum(rewards) / samples,
        "rollout/ended_fraction": sum(g.ended for g in groups) / samples,
        "rollout/response_tokens": sum(g.tokens for g in groups) / samples,
        "rollout/pairs": float(len(pairs)),
        "rollout/margin": sum(p["chosen_reward"] - p["rejected_reward"] for p in pairs) / max(len(pairs), 1),
    }
