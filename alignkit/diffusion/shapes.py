"""The shape world's images: one coloured shape on a coloured background, 32x32.

    ShapeSpec("circle", "red", "blue")  ->  a red disc of random size and position on a blue square

Small enough that a tiny conditional diffusion model learns it in minutes on a CPU, structured
enough that a reward can check an image against its caption (shape, colour, background) and that
sample diversity (position, size) can be measured. The captions and their vocabulary are
`alignkit.tasks.shapes`. Deterministic in the generator's seed.
"""

from __future__ import annotations

import numpy as np

from alignkit.tasks.shapes import COLOURS, ShapeSpec

__all__ = ["SIZE", "render"]

SIZE = 32
_SUPER = 4  # supersampling factor: smooth edges, so a model does not have to learn aliasing


def _mask(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """(S, S) bool at the supersampled resolution."""
    n = SIZE * _SUPER
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / _SUPER
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated frame
    if shape == "square":
        half = r * 0.85
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # triangle: equilateral, circumradius r, pointing up in its own frame
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        theta = np.pi / 2 + k * 2 * np.pi / 3
        nx, ny = np.cos(theta + np.pi / 3), np.sin(theta + np.pi / 3)  # outward normal of the opposite side
        inside &= (u * -nx + v * ny) <= r / 2
    return inside


def render(spec: ShapeSpec, rng: np.random.Generator) -> np.ndarray:
    """(32, 32, 3) uint8: the shape, upright, at a random position and size. (Rotated squares at
    this resolution pass for circles: a judge could not tell them apart reliably.)"""
    r = rng.uniform(6.0, 10.0)
    cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
    angle = 0.0
    mask = _mask(spec.shape, cx, cy, r, angle).astype(np.float32)
    # average the supersampled mask down: fractional coverage at the edges
    coverage = mask.reshape(SIZE, _SUPER, SIZE, _SUPER).mean(axis=(1, 3))[..., None]  # (32, 32, 1)
    fg, bg = np.array(COLOURS[spec.colour], np.float32), np.array(COLOURS[spec.background], np.float32)
    return np.clip(coverage * fg + (1 - coverage) * bg + 0.5, 0, 255).astype(np.uint8)
