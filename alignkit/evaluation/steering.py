"""How well a model follows requested attributes (SteerLM's evaluation on the task world).

For each controlled attribute and each requested level 0..4, the model answers every prompt
with the label asking for that level (the other attributes at `base` targets); the oracle
measures the attribute on each answer. Reported:

- `<attribute>_spearman`: Spearman rank correlation between requested and measured levels over
  all (prompt, level) answers: does asking for more give more?
- `<attribute>_accuracy`: fraction of answers whose measured level equals the requested one;
  `attribute_accuracy`: the same over all controlled attributes and levels;
- `<attribute>_by_level`: the mean measured level for each requested level 0..4.

A model that is not a SteerLM model can be measured with `steer` (another model's label
format): it sees the same label line in its prompt, and shows what ignoring the request gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from alignkit.config import SamplingConfig
from alignkit.data.steerlm import MAX_LEVEL, MIN_LEVEL, SteerLMFormat
from alignkit.evaluation.evaluate import sample_responses
from alignkit.evaluation.stats import spearman
from alignkit.models.loading import load_for_eval
from alignkit.tasks import score_response

__all__ = ["attribute_control"]

GREEDY = SamplingConfig(max_new_tokens=96, temperature=0.0)


def attribute_control(
    model_dir: str | Path,
    prompts: list[dict[str, Any]],
    controlled: list[str],
    base: dict[str, int] | None = None,
    params: SamplingConfig = GREEDY,
    steer: SteerLMFormat | None = None,
) -> dict[str, Any]:
    """Requested-vs-measured statistics for each controlled attribute (see the module docstring)."""
    model, tokenizer = load_for_eval(model_dir)
    fmt = SteerLMFormat.from_config(model.config) or steer
    if fmt is None:
        raise ValueError(f"{model_dir} is not a SteerLM model; pass `steer` to measure it with another's labels")
    levels = list(range(MIN_LEVEL, MAX_LEVEL + 1))
    metrics: dict[str, Any] = {}
    hits = total = 0
    for name in controlled:
        asked = [{**p, "attributes": {**(base or {}), name: level}} for level in levels for p in prompts]
        completions = sample_responses(model, tokenizer, asked, params, steer=fmt)
        requested = [a["attributes"][name] for a in asked]
        measured = [getattr(score_response(a, c.text), name) for a, c in zip(asked, completions)]
        matched = [int(r == m) for r, m in zip(requested, measured)]
        metrics[f"{name}_spearman"] = spearman(requested, measured)
        metrics[f"{name}_accuracy"] = float(np.mean(matched))
        metrics[f"{name}_by_level"] = [
            float(np.mean([m for r, m in zip(requested, measured) if r == level])) for level in levels
        ]
        hits, total = hits + sum(matched), total + len(matched)
    metrics["attribute_accuracy"] = hits / max(total, 1)
    return metrics
