"""Image grids: rows of samples saved as one PNG (validation grids, `alignkit generate-images`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["save_grid", "to_uint8"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) floats in [-1, 1] -> (..., H, W, 3) uint8."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1).cpu().numpy()


def save_grid(
    rows: torch.Tensor, path: str | Path, scale: int = 4, labels: list[str] | None = None, gap: int = 2
) -> Path:
    """Save (R, C, 3, H, W) images in [-1, 1] as one PNG: R rows of C images, each enlarged `scale`
    times (nearest neighbour: small images stay sharp), with a grey `gap` between them and, if
    given, one label per row written above it."""
    R, C, _, H, W = rows.shape
    cell_h, cell_w = H * scale, W * scale
    label_h = 12 if labels else 0
    canvas = Image.new("RGB", (C * (cell_w + gap) + gap, R * (cell_h + gap + label_h) + gap), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    pixels = to_uint8(rows)
    for r in range(R):
        top = gap + r * (cell_h + gap + label_h)
        if labels:
            draw.text((gap + 2, top), labels[r][: C * (cell_w + gap) // 6], fill=(255, 255, 255))  # ~6 px a character
        for c in range(C):
            image = Image.fromarray(pixels[r, c]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(image, (gap + c * (cell_w + gap), top + label_h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
