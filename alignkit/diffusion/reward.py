"""Differentiable image rewards for DRaFT+.

A reward is a module `reward(images, captions) -> (B,)`, differentiable in `images` (B, 3, H, W)
with values in [-1, 1] (what a VAE decodes). The shape world's reward is `ShapeJudge`: a small CNN
trained on rendered shape-world images to tell the shape, its colour and the background; the
reward of an image for a caption is the mean of the three probabilities the judge gives to the
caption's shape, colour and background (0..1: 1 when the image shows exactly the caption).

    judge, report = train_shape_judge(n=6000)       # ~30 s on a CPU; held-out accuracies 1.0 at n=3000
    judge.save("runs/shapes/judge"); ShapeJudge.load("runs/shapes/judge")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignkit.diffusion.shapes import BACKGROUNDS, COLOURS, SHAPES, parse_caption, render, shape_records

__all__ = ["ShapeJudge", "render_batch", "train_shape_judge"]

_HEADS = {"shape": list(SHAPES), "colour": list(COLOURS), "background": list(BACKGROUNDS)}


def render_batch(specs, seed: int) -> torch.Tensor:
    """(B, 3, 32, 32) float images in [-1, 1] of the specs, each drawn with its own seeded generator."""
    images = [render(spec, np.random.default_rng([seed, i])) for i, spec in enumerate(specs)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ShapeJudge(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] -> logits of the shape, its colour and the background."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            # GroupNorm: a yellow-on-white edge and a red-on-black edge give features of one scale
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.features = nn.Sequential(  # 32 -> 16 -> 8, then pooled: where the shape is does not matter
            *block(3, width, 1), *block(width, width, 2), *block(width, 2 * width, 1),
            *block(2 * width, 2 * width, 2), *block(2 * width, 2 * width, 1),
        )
        self.pool = nn.Sequential(nn.Linear(4 * width, 128), nn.SiLU())  # [mean, max] over positions
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(labels)) for name, labels in _HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)  # (B, 2w, 8, 8)
        h = self.pool(torch.cat([f.mean((2, 3)), f.amax((2, 3))], -1))  # (B, 128)
        return {name: head(h) for name, head in self.heads.items()}

    @staticmethod
    def targets(captions: list[str], device=None) -> dict[str, torch.Tensor]:
        specs = [parse_caption(c) for c in captions]
        return {name: torch.tensor([labels.index(getattr(s, name)) for s in specs], device=device)
                for name, labels in _HEADS.items()}

    def reward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(B,) mean over shape, colour and background of p(the caption's value | image); differentiable."""
        logits = self(images)
        targets = self.targets(captions, images.device)
        probs = [logits[k].softmax(-1).gather(-1, targets[k][:, None]).squeeze(-1) for k in _HEADS]
        return torch.stack(probs).mean(0)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps({"kind": "shape_judge", "width": self.width, **_HEADS}))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ShapeJudge":
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        if config.get("kind") != "shape_judge" or any(config.get(k) != v for k, v in _HEADS.items()):
            raise ValueError(f"{directory}: not a shape-world judge for these shapes and colours")
        judge = cls(config["width"])
        judge.load_state_dict(load_file(directory / "model.safetensors"))
        return judge.eval().requires_grad_(False)


def train_shape_judge(n: int = 6000, epochs: int = 3, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                      held_out: int = 500) -> tuple[ShapeJudge, dict[str, float]]:
    """Train a judge on n rendered images; returns it (eval mode, frozen) and held-out accuracies."""
    torch.manual_seed(seed)
    specs = shape_records(n + held_out, seed=seed)
    images = render_batch(specs, seed)
    captions = [s.caption for s in specs]
    judge = ShapeJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=order).split(batch_size):
            logits = judge(images[idx])
            targets = ShapeJudge.targets([captions[i] for i in idx.tolist()])
            loss = sum(loss_fn(logits[k], targets[k]) for k in _HEADS)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    judge.eval().requires_grad_(False)
    with torch.no_grad():
        logits = judge(images[n:])
        targets = ShapeJudge.targets(captions[n:])
        report = {f"accuracy/{k}": float((logits[k].argmax(-1) == targets[k]).float().mean()) for k in _HEADS}
        report["reward/matching"] = float(judge.reward(images[n:], captions[n:]).mean())
    return judge, report
