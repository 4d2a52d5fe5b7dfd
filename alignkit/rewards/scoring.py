"""Scoring a dataset with a reward model: `alignkit score`.

    alignkit score --model runs/rm/final --data pairs.jsonl --out scored.jsonl

Records are `{prompt, response}` (or `completion`), or preference pairs (`chosen`/`rejected`, or
NeMo-Aligner's `chosen_response`/`rejected_response`), whose sides are both scored. Each row gets
`score` (pairs: `chosen_score`, `rejected_score`, ...) and, for a model with several attributes,
`score_attributes` {name: value}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.data.formats import messages_from_value
from alignkit.data.io import DataError, Record, read_records
from alignkit.data.preference import RESPONSE_KEYS
from alignkit.rewards.local import LocalRewardModel, RewardOutput

__all__ = ["DatasetScores", "score_dataset"]


@dataclass
class DatasetScores:
    rows: list[dict[str, Any]]  # the records with their scores
    rewards: torch.Tensor  # (sides x N,) every score, side after side
    accuracy: float | None  # preference pairs: the fraction where chosen outscores rejected


def _sides(records: list[Record]) -> list[str]:
    """The response fields to score, read from the first record; every record must have them."""
    first = records[0].data
    pair_keys = next((k for k in RESPONSE_KEYS if k[0] in first), None)
    sides = list(pair_keys) if pair_keys else ["completion" if "completion" in first else "response"]
    for r in records:
        missing = [k for k in ("prompt", *sides) if k not in r.data]
        if missing:
            raise DataError(
                f"{r.source}: missing field(s) {', '.join(missing)} (every record must have "
                f"{', '.join(('prompt', *sides))}, like the first)"
            )
        for side in sides:
            if not isinstance(r.data[side], str):
                raise DataError(f"{r.source}: field '{side}' must be text, got {type(r.data[side]).__name__}")
        messages_from_value(r.data["prompt"], "user", f"{r.source}: field 'prompt'")  # text or messages
    return sides


def _rows(records: list[Record], scored: dict[str, RewardOutput], names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(records):
        row = dict(r.data)
        for side, out in scored.items():
            prefix = "" if len(scored) == 1 else f"{side}_"
            row[f"{prefix}score"] = float(out.rewards[i])
            if len(names) > 1:
                row[f"{prefix}score_attributes"] = dict(zip(names, out.attributes[i].tolist()))
        rows.append(row)
    return rows


def score_dataset(
    data: str | Path, model_dir: str | Path, batch_size: int = 16, normalize: bool = False
) -> DatasetScores:
    """Every response of `data` (both sides of a pair) scored by the reward model in `model_dir`."""
    records = read_records(data)
    if not records:
        raise DataError(f"{data}: no records")
    rm = LocalRewardModel(model_dir, batch_size=batch_size, normalize=normalize)
    sides = _sides(records)
    scored = {side: rm.score([r.data["prompt"] for r in records], [r.data[side] for r in records]) for side in sides}
    accuracy = None
    if len(sides) == 2:
        accuracy = float((scored[sides[0]].rewards > scored[sides[1]].rewards).float().mean())
    return DatasetScores(_rows(records, scored, rm.names), torch.cat([scored[s].rewards for s in sides]), accuracy)
