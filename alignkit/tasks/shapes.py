"""The shape world's words: captions of one coloured shape on a coloured background.

    "a red circle on blue"  ->  ShapeSpec("circle", "red", "blue")

The text half of the shape world (DRaFT+'s task world): the vocabulary, the caption format, and
seeded lists of specs and caption prompt records (`builtin:captions`). Rendering the images is
`alignkit.diffusion.shapes`. Deterministic in (n, seed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "ShapeSpec", "caption_records", "parse_caption", "shape_records"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 200),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
BACKGROUNDS = ("white", "black", "blue", "green", "yellow")
SHAPES = ("circle", "square", "triangle")
_CAPTION = re.compile(r"^an? (\w+) (\w+) on (\w+)$")


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on {self.background}"


def parse_caption(caption: str) -> ShapeSpec:
    """ "a red circle on blue" -> ShapeSpec("circle", "red", "blue"); anything else is a ValueError
    that says what a caption looks like."""
    match = _CAPTION.match(caption.strip().lower())
    if not match or match.group(2) not in SHAPES or match.group(1) not in COLOURS or match.group(3) not in COLOURS:
        raise ValueError(
            f"not a shape-world caption: {caption!r} (expected 'a <colour> <shape> on <colour>', "
            f"shapes {', '.join(SHAPES)}, colours {', '.join(COLOURS)})"
        )
    return ShapeSpec(match.group(2), match.group(1), match.group(3))


def shape_records(n: int, seed: int = 0) -> list[ShapeSpec]:
    """n random (shape, colour, background) with the shape's colour never the background's."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        if colour != background:
            out.append(ShapeSpec(shape, colour, background))
    return out


def caption_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n prompt records {"prompt": caption}: the world's 90 distinct captions in a seeded order,
    repeated in that order when n > 90."""
    specs = [
        ShapeSpec(shape, colour, background)
        for shape in SHAPES
        for colour in COLOURS
        for background in BACKGROUNDS
        if colour != background
    ]
    order = np.random.default_rng(seed).permutation(len(specs))
    return [{"prompt": specs[order[i % len(specs)]].caption} for i in range(n)]
