"""Dataset builders: task-world prompts + demonstrator + oracle -> the JSONL files recipes read.

Each `*_records` function returns plain dicts, deterministic in (n, seed, split); `builtin:`
names call them directly, and `dataset_builders` lists the files that `alignkit build-data`
(`alignkit.data.taskworld.build_datasets`) writes to a directory:

    alignkit build-data --out data/taskworld --seed 0

- pretrain.jsonl: {"text": "<|user|>\\n{prompt}</s><|assistant|>\\n{response}</s>"}, mixed quality, and
  `practice` worked-exercise documents mixed in (several exchanges each, every answer right; see
  `practice_records`)
- sft.jsonl, sft_valid.jsonl: {"prompt", "response"}, good demonstrations (SFT, distillation)
- prefs.jsonl, prefs_valid.jsonl: {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward",
  "margin"} (DPO family, pairwise reward models)
- attributes.jsonl, attributes_valid.jsonl: {"prompt", "response", "attributes": {name: 0..4}}
  (SteerLM, regression reward models)
- kto.jsonl: {"prompt", "completion", "label": bool}
- prompts.jsonl: {"prompt", "task", "args", "answer", "split", "id"} (PPO, REINFORCE, rejection sampling)
- eval_prompts.jsonl: the same, held-out `test` split, no two alike, an equal count per skill
- redteam.jsonl: the same, held-out red-team prompts only

Train files draw from the `train` split, `*_valid` from `valid`, evaluation files from `test`;
the splits never share a question (see `alignkit.tasks.world`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignkit.tasks.demonstrator import GOOD_NOISE, MIXED_NOISE, Demonstrator, Style, demonstrate
from alignkit.tasks.oracle import score_response
from alignkit.tasks.world import SKILLS, generate_prompts

__all__ = [
    "DatasetSizes",
    "best_worst_pair",
    "ranked_pairs",
    "attribute_records",
    "dataset_builders",
    "eval_prompt_records",
    "kto_records",
    "preference_records",
    "pretrain_corpus",
    "pretrain_records",
    "practice_records",
    "prompt_records",
    "sft_records",
    "steer_prompt_records",
]

KTO_DESIRABLE_REWARD = 0.8  # a KTO completion is "desirable" at or above this oracle reward
MIN_PREFERENCE_MARGIN = 0.05
PREFERENCE_SAMPLES = 4  # responses drawn per prompt; the oracle's best and worst become the pair


def _derive(seed: int, name: str) -> int:
    """A seed of its own for each dataset, so that (say) SFT and preference prompts differ."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=4).digest(), "big")


def _chat_text(prompt: str, response: str) -> str:
    # The project's chat template (alignkit.models.tokenizer.CHAT_TEMPLATE), written out.
    return f"<|user|>\n{prompt}</s><|assistant|>\n{response}</s>"


def pretrain_records(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Mixed-quality demonstrations as plain chat-formatted text."""
    demonstrator = Demonstrator(MIXED_NOISE, _derive(seed, "pretrain"))
    prompts = generate_prompts(n, _derive(seed, "pretrain"), split)
    return [{"text": _chat_text(p["prompt"], demonstrator.respond(p).response)} for p in prompts]


PRACTICE_SKILLS = ("arith", "reverse", "capitalise", "count", "sort", "lookup")  # the checkable skills
PRACTICE_STYLE = Style(correct=True, verbosity=1, politeness=2)  # one neutral answer sentence, no filler


def practice_records(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Worked exercises: `n` chat-formatted documents, each a prompt of a checkable skill and its
    right answer in one neutral sentence (`The reverse of 'tiger' is 'regit'.`, `Ana lives in
    Oslo.`), no filler.

    What a pretraining corpus needs for a small model to learn to copy: the mixed-quality documents
    repeat the prompt's word or fact among courtesies, rambling and a 35% chance of a wrong answer,
    too rarely and too noisily for a 4-layer model to find the copy in a few hundred steps
    (docs/demo.md measures it); here every answer copies, reverses, recases, counts, sorts or looks
    up what the prompt shows. One exchange per document: in a packed row each document attends only
    to itself, so the letters of an earlier exchange are never a wrong place to copy from."""
    rng = random.Random(_derive(seed, "practice"))
    prompts = generate_prompts(n, _derive(seed, "practice"), split, PRACTICE_SKILLS)
    return [{"text": _chat_text(p["prompt"], demonstrate(p, PRACTICE_STYLE, rng).response)} for p in prompts]


def pretrain_corpus(n: int, practice: int = 0, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """The base model's corpus: `n` mixed-quality documents (`pretrain_records`) and `practice`
    worked-exercise documents (`practice_records`), shuffled together (deterministic in seed; with no
    practice documents, `pretrain_records` as they are)."""
    records = pretrain_records(n, seed, split)
    if practice:
        records += practice_records(practice, seed, split)
        random.Random(_derive(seed, "corpus")).shuffle(records)
    return records


def sft_records(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Good demonstrations: correct, courteous, on-topic, short; red-team prompts refused."""
    demonstrator = Demonstrator(GOOD_NOISE, _derive(seed, "sft"))
    prompts = generate_prompts(n, _derive(seed, "sft"), split)
    return [{"prompt": p["prompt"], "response": demonstrator.respond(p).response} for p in prompts]


def preference_records(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Pairs chosen by the oracle: of a few mixed-quality responses, the best and the worst.

    Prompts whose responses all score within MIN_PREFERENCE_MARGIN are skipped (and replaced),
    so every pair has chosen_reward - rejected_reward >= MIN_PREFERENCE_MARGIN.
    """
    demonstrator = Demonstrator(MIXED_NOISE, _derive(seed, "prefs"))
    records: list[dict[str, Any]] = []
    batch = 0
    while len(records) < n:
        # Draw a few more prompts than needed; a tie (rare) costs one prompt.
        prompts = generate_prompts(n - len(records) + 8, _derive(seed, f"prefs{batch}"), split)
        batch += 1
        for p in prompts:
            scored = []
            for k in range(PREFERENCE_SAMPLES):
                response = demonstrator.respond(p, k).response
                scored.append((score_response(p, response).reward, response))
            record = best_worst_pair(p["prompt"], scored)
            if record is None:
                continue
            records.append(record)
            if len(records) == n:
                break
    return records


def best_worst_pair(
    prompt: str, scored: list[tuple[float, str]], min_margin: float = MIN_PREFERENCE_MARGIN
) -> dict[str, Any] | None:
    """A preference record from (reward, response) candidates for one prompt: the best is chosen,
    the worst rejected (candidates compare by reward, then text); None when their rewards differ
    by less than `min_margin`."""
    (low, rejected), (high, chosen) = min(scored), max(scored)
    if high - low < min_margin:
        return None
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_reward": high,
        "rejected_reward": low,
        "margin": round(high - low, 4),
    }


def ranked_pairs(
    prompt: str, scored: list[tuple[float, str]], min_margin: float = MIN_PREFERENCE_MARGIN
) -> list[dict[str, Any]]:
    """Every comparison among one prompt's distinct candidates whose rewards differ by at least
    `min_margin` (InstructGPT's K-choose-2 comparisons): 4 candidates give up to 6 pairs, where
    `best_worst_pair` gives 1. Pairs come in candidate order (the first of two is compared first);
    a response repeated verbatim counts once (its first reward)."""
    distinct: dict[str, float] = {}
    for reward, text in scored:
        distinct.setdefault(text, reward)
    records = []
    for i, (text_a, reward_a) in enumerate(distinct.items()):
        for text_b, reward_b in list(distinct.items())[i + 1 :]:
            if abs(reward_a - reward_b) < min_margin:
                continue
            (high, chosen), (low, rejected) = sorted([(reward_a, text_a), (reward_b, text_b)], reverse=True)
            records.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_reward": high,
                    "rejected_reward": low,
                    "margin": round(high - low, 4),
                }
            )
    return records


def attribute_records(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Mixed-quality responses labelled with the oracle's seven 0-4 attributes."""
    demonstrator = Demonstrator(MIXED_NOISE, _derive(seed, "attributes"))
    records = []
    for p in generate_prompts(n, _derive(seed, "attributes"), split):
        response = demonstrator.respond(p).response
        attributes = score_response(p, response).attributes()
        records.append({"prompt": p["prompt"], "response": response, "attributes": attributes})
    return records


STEERABLE_ATTRIBUTES = ("verbosity", "politeness")  # the attributes the demonstrator writes exactly


def steer_prompt_records(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Prompt records with target `attributes`: a random level 0..4 of each steerable attribute
    (SteerLM 2.0's (prompt, target) pairs, steering evaluation)."""
    rng = random.Random(_derive(seed, "steer"))
    return [
        {**p, "attributes": {a: rng.randrange(5) for a in STEERABLE_ATTRIBUTES}}
        for p in generate_prompts(n, _derive(seed, "steer"), split)
    ]


def kto_records(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Unpaired completions labelled desirable when the oracle reward >= KTO_DESIRABLE_REWARD."""
    demonstrator = Demonstrator(MIXED_NOISE, _derive(seed, "kto"))
    records = []
    for p in generate_prompts(n, _derive(seed, "kto"), split):
        completion = demonstrator.respond(p).response
        label = score_response(p, completion).reward >= KTO_DESIRABLE_REWARD
        records.append({"prompt": p["prompt"], "completion": completion, "label": label})
    return records


def prompt_records(
    n: int, seed: int = 0, split: str = "train", skills: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """Prompt-only records with the oracle's metadata (task, args, answer), for RL and sampling."""
    return generate_prompts(n, _derive(seed, "prompts"), split, skills)


def eval_prompt_records(per_skill: int, seed: int = 0, skills: tuple[str, ...] = SKILLS) -> list[dict[str, Any]]:
    """Held-out (`test` split) prompts, no two alike, `per_skill` of each skill (fewer if a skill runs out)."""
    return [
        record
        for skill in skills
        for record in generate_prompts(per_skill, _derive(seed, f"eval:{skill}"), "test", (skill,), unique=True)
    ]


# --- every dataset file ------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSizes:
    pretrain: int = 20000
    practice: int = 0  # worked-exercise documents mixed into pretrain.jsonl (practice_records)
    sft: int = 4000
    prefs: int = 4000
    attributes: int = 4000
    kto: int = 4000
    prompts: int = 2000
    valid: int = 200  # each of sft_valid, prefs_valid, attributes_valid
    eval_per_skill: int = 400  # 2800 held-out prompts: the reward CI half-width ~0.007
    redteam: int = 200


Builder = Callable[[], list[dict[str, Any]]]


def dataset_builders(seed: int = 0, sizes: DatasetSizes = DatasetSizes()) -> dict[str, Builder]:
    """{file name: a function that generates its records}, for every task-world dataset file, in the
    order they are written."""
    return {
        "pretrain": lambda: pretrain_corpus(sizes.pretrain, sizes.practice, seed),
        "sft": lambda: sft_records(sizes.sft, seed),
        "sft_valid": lambda: sft_records(sizes.valid, seed, "valid"),
        "prefs": lambda: preference_records(sizes.prefs, seed),
        "prefs_valid": lambda: preference_records(sizes.valid, seed, "valid"),
        "attributes": lambda: attribute_records(sizes.attributes, seed),
        "attributes_valid": lambda: attribute_records(sizes.valid, seed, "valid"),
        "kto": lambda: kto_records(sizes.kto, seed),
        "prompts": lambda: prompt_records(sizes.prompts, seed),
        "eval_prompts": lambda: eval_prompt_records(sizes.eval_per_skill, seed),
        "redteam": lambda: eval_prompt_records(sizes.redteam, seed, ("redteam",)),
    }
