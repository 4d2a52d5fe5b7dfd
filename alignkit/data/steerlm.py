"""SteerLM attribute labels: `helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:1`.

SteerLM (Dong et al. 2023) conditions a model on the attributes of the response it should write.
The label string is the attribute values, clipped to 0..4 and rounded (as NeMo-Aligner's
`attribute_annotate.py` does with its reward model's outputs), in a fixed order. Parsing is
strict: a malformed label is an error that says what is wrong, never a silently dropped attribute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["DEFAULT_ATTRIBUTES", "LabelError", "format_attribute_label", "parse_attribute_label"]

DEFAULT_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
MIN_LEVEL, MAX_LEVEL = 0, 4


class LabelError(ValueError):
    """A SteerLM attribute label that cannot be read."""


def format_attribute_label(values: Mapping[str, float], names: Sequence[str] = DEFAULT_ATTRIBUTES) -> str:
    """`name:level,...` in the order of `names`; each value clipped to 0..4 and rounded (half up).

    Example: {"helpfulness": 3.6, "verbosity": -0.4} with names (helpfulness, verbosity) ->
    "helpfulness:4,verbosity:0".
    """
    parts = []
    for name in names:
        if name not in values:
            raise LabelError(f"no value for attribute {name!r} (have: {', '.join(values) or 'none'})")
        value = float(values[name])
        if not math.isfinite(value):
            raise LabelError(f"attribute {name!r} has a non-finite value {value!r}")
        level = int(math.floor(min(max(value, MIN_LEVEL), MAX_LEVEL) + 0.5))
        parts.append(f"{name}:{level}")
    return ",".join(parts)


def parse_attribute_label(label: str, names: Sequence[str] | None = DEFAULT_ATTRIBUTES) -> dict[str, int]:
    """`name:level,...` -> {name: level}. With `names`, exactly those attributes, in that order."""
    if not isinstance(label, str) or not label.strip():
        raise LabelError(f"empty attribute label {label!r}")
    out: dict[str, int] = {}
    for part in label.strip().split(","):
        name, sep, raw = part.strip().partition(":")
        if not sep or not name:
            raise LabelError(f"label {label!r}: {part!r} is not name:level")
        try:
            level = int(raw)
        except ValueError:
            raise LabelError(f"label {label!r}: level {raw!r} of {name!r} is not an integer") from None
        if not MIN_LEVEL <= level <= MAX_LEVEL:
            raise LabelError(f"label {label!r}: level {level} of {name!r} is outside {MIN_LEVEL}..{MAX_LEVEL}")
        if name in out:
            raise LabelError(f"label {label!r}: attribute {name!r} appears twice")
        out[name] = level
    if names is not None and list(out) != list(names):
        unknown = [n for n in out if n not in names]
        missing = [n for n in names if n not in out]
        detail = "; ".join(filter(None, [f"unknown {unknown}" if unknown else "",
                                         f"missing {missing}" if missing else "",
                                         "" if unknown or missing else "out of order"]))
        raise LabelError(f"label {label!r}: expected the attributes {', '.join(names)} in this order ({detail})")
    return out
