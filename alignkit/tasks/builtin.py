"""Built-in generated datasets, addressed as `builtin:NAME?n=N&seed=S[&split=train|valid|test]`
wherever a dataset path goes (`alignkit.data.io.read_records` resolves the address).

They let every shipped config run on a fresh machine with no files: the records are generated
deterministically from the seed, as plain dicts. Names (`BUILTIN_DATASETS`):

- `sft`, `chat`: smoke-test data for the `tiny` configs: two skills (adding two numbers,
  reversing a word) in one fixed short format, so each example fits 128 byte-level tokens and a
  30-step run visibly learns it. Prompt/response and multi-turn chat (system + two exchanges).
  These prompts are task-world prompts too, so the oracle scores responses to them.
- From the task world (`alignkit.tasks`, all seven skills, held-out splits):
  - `demos`: good prompt/response demonstrations (the SFT set).
  - `pretrain`: mixed-quality demonstrations as chat-formatted `{"text"}`.
  - `prefs`: oracle-ranked preference pairs (prompt, chosen, rejected, rewards, margin).
  - `attributes`: responses with the oracle's 0-4 attribute labels (SteerLM, regression RMs).
  - `kto`: unpaired completions with a desirable/undesirable label.
  - `prompts`: prompt records with the oracle's metadata (RL, rejection sampling).
  - `steer`: prompt records with random target `attributes` (verbosity, politeness 0-4; SteerLM 2.0).
  - `eval`: held-out prompts, no two alike; `redteam`: held-out red-team prompts.
- `captions`: the shape world's image captions as prompt records (DRaFT+), "a red circle on blue".

Defaults: n=256, seed=0, split=train (test for `eval` and `redteam`; `sft` and `chat` have none).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from alignkit.tasks import datasets as _ds
from alignkit.tasks.shapes import caption_records
from alignkit.tasks.world import generate_prompts

__all__ = ["BUILTIN_DATASETS", "Generator"]

# --- smoke-test data (unchanged since the first release: recipe tests pin what it teaches) ---

_WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "house", "green", "quiet"]


def _qa(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    word = rng.choice(_WORDS)
    return f"Reverse the word '{word}'.", f"The reverse of '{word}' is '{word[::-1]}'."


def _smoke_sft(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [dict(zip(("prompt", "response"), _qa(rng))) for _ in range(n)]


def _smoke_chat(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": "You are a careful assistant."}]
        for _ in range(2):
            prompt, response = _qa(rng)
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        records.append({"messages": messages})
    return records


# --- names ------------------------------------------------------------------------------------

Generator = Callable[[int, int, str | None], list[dict[str, Any]]]  # (n, seed, split) -> records

# name -> (generator, default split; None: the name has no splits)
BUILTIN_DATASETS: dict[str, tuple[Generator, str | None]] = {
    "sft": (_smoke_sft, None),
    "chat": (_smoke_chat, None),
    "demos": (_ds.sft_records, "train"),
    "pretrain": (_ds.pretrain_records, "train"),
    "prefs": (_ds.preference_records, "train"),
    "attributes": (_ds.attribute_records, "train"),
    "kto": (_ds.kto_records, "train"),
    "prompts": (_ds.prompt_records, "train"),
    "steer": (_ds.steer_prompt_records, "train"),
    "eval": (lambda n, seed, split: generate_prompts(n, seed, split, unique=True), "test"),
    "redteam": (lambda n, seed, split: generate_prompts(n, seed, split, ("redteam",), unique=True), "test"),
    "captions": (lambda n, seed, split: caption_records(n, seed), None),
}
