"""Built-in generated datasets, addressed as `builtin:NAME?n=N&seed=S`.

They let every shipped `tiny` config run on a fresh machine with no files: the records are
generated deterministically from the seed. Names:

- `sft`: prompt/response demonstrations of small checkable skills (arithmetic, reversing a word).
- `chat`: multi-turn conversations (a system prompt, two user/assistant exchanges).
"""

from __future__ import annotations

import random
from urllib.parse import parse_qs, urlsplit

from alignkit.data.io import DataError, Record

__all__ = ["builtin_records"]

_WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "house", "green", "quiet"]


def _qa(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    word = rng.choice(_WORDS)
    return f"Reverse the word '{word}'.", f"The reverse of '{word}' is '{word[::-1]}'."


def _sft(rng: random.Random) -> dict:
    prompt, response = _qa(rng)
    return {"prompt": prompt, "response": response}


def _chat(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": "You are a careful assistant."}]
    for _ in range(2):
        prompt, response = _qa(rng)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"messages": messages}


_GENERATORS = {"sft": _sft, "chat": _chat}


def builtin_records(spec: str) -> list[Record]:
    """Records for `builtin:NAME?n=N&seed=S` (defaults n=256, seed=0)."""
    parts = urlsplit(spec.removeprefix("builtin:"))
    name = parts.path
    if name not in _GENERATORS:
        raise DataError(f"unknown built-in dataset {spec!r} (available: {', '.join(_GENERATORS)})")
    try:
        query = {k: int(v[-1]) for k, v in parse_qs(parts.query).items()}
    except ValueError:
        raise DataError(f"{spec!r}: query values must be integers, e.g. builtin:{name}?n=256&seed=0") from None
    unknown = set(query) - {"n", "seed"}
    if unknown:
        raise DataError(f"{spec!r}: unknown parameter(s) {sorted(unknown)} (use n and seed)")
    rng = random.Random(query.get("seed", 0))
    generate = _GENERATORS[name]
    return [Record(generate(rng), f"{spec}#{i}") for i in range(query.get("n", 256))]
