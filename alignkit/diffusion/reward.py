"""Differentiable image rewards for DRaFT+.

A reward is a module `reward(images, captions) -> (B,)`, differentiable in `images` (B, 3, H, W)
with values in [-1, 1] (what a VAE decodes). The shape world's reward is `ShapeJudge`: a small CNN
trained on rendered shape-world images to tell the shape, its colour and the background; the
reward of an image for a caption is the mean of the three probabilities the judge gives to the
caption's shape, colour and background (0..1: 1 when the image shows exactly the caption).

    judge, report = train_shape_judge(n=6000)       # ~30 s on a CPU; held-out accuracies 1.0 at n=3000
    judge.save("runs/shapes/judge"); ShapeJudge.load("runs/shapes/judge")

For real pipelines, `ClipScorer` is a PickScore-style reward from any local CLIP checkpoint
(`CLIPModel` + its tokenizer): exp(logit_scale) * cos(image embedding, caption embedding), with
the image resized and normalised differentiably. `load_image_reward(spec)` picks the kind from a
directory's config, or imports a `package.module:function` taking (images, captions).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from alignkit.diffusion.shapes import render
from alignkit.tasks.shapes import BACKGROUNDS, COLOURS, SHAPES, parse_caption, shape_records

__all__ = ["ClipScorer", "ShapeJudge", "brightness_reward", "load_image_reward", "render_batch", "train_shape_judge"]

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
            *block(3, width, 1),
            *block(width, width, 2),
            *block(width, 2 * width, 1),
            *block(2 * width, 2 * width, 2),
            *block(2 * width, 2 * width, 1),
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
        return {
            name: torch.tensor([labels.index(getattr(s, name)) for s in specs], device=device)
            for name, labels in _HEADS.items()
        }

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
    def load(cls, directory: str | Path) -> ShapeJudge:
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        if config.get("kind") != "shape_judge" or any(config.get(k) != v for k, v in _HEADS.items()):
            raise ValueError(f"{directory}: not a shape-world judge for these shapes and colours")
        judge = cls(config["width"])
        judge.load_state_dict(load_file(directory / "model.safetensors"))
        return judge.eval().requires_grad_(False)


def train_shape_judge(
    n: int = 6000, epochs: int = 3, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, held_out: int = 500
) -> tuple[ShapeJudge, dict[str, float]]:
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


class ClipScorer(nn.Module):
    """PickScore-style reward from a local CLIP checkpoint: exp(logit_scale) * cos(f_image, f_text).

    Images (B, 3, H, W) in [-1, 1] are resized (bicubic) to the vision tower's size and normalised
    with the checkpoint's mean and std (OpenAI CLIP's when it has no preprocessor config), all
    differentiably, so the reward's gradient reaches the pixels."""

    _OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
    _OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, model, tokenizer, mean=_OPENAI_MEAN, std=_OPENAI_STD):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def load(cls, directory: str | Path) -> ClipScorer:
        from transformers import AutoTokenizer, CLIPModel  # local: CLIP costs seconds of start-up

        directory = Path(directory)
        model = CLIPModel.from_pretrained(directory, local_files_only=True).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        processor = directory / "preprocessor_config.json"
        stats = json.loads(processor.read_text()) if processor.is_file() else {}
        return cls(model, tokenizer, stats.get("image_mean", cls._OPENAI_MEAN), stats.get("image_std", cls._OPENAI_STD))

    def reward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        size = self.model.config.vision_config.image_size
        pixels = F.interpolate((images.float() + 1) / 2, size=(size, size), mode="bicubic", align_corners=False)
        pixels = (pixels - self.mean) / self.std
        text = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt").to(images.device)
        image_features = self.model.get_image_features(pixel_values=pixels).pooler_output  # (B, P)
        text_features = self.model.get_text_features(**text).pooler_output  # (B, P)
        cosine = F.cosine_similarity(image_features, text_features, dim=-1)
        return self.model.logit_scale.exp() * cosine


ImageReward = Callable[[torch.Tensor, list[str]], torch.Tensor]  # (images (B, 3, H, W), captions) -> (B,)


def load_image_reward(spec: str, device: str | torch.device = "cpu") -> ImageReward:
    """A differentiable reward `(images (B, 3, H, W) in [-1, 1], captions) -> (B,)` from
    a directory (a shape-world judge, or any CLIP checkpoint) or `package.module:function`."""
    path = Path(spec)
    if path.is_dir():
        config_file = path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if config.get("kind") == "shape_judge":
            return ShapeJudge.load(path).to(device).reward
        if config.get("model_type") == "clip":
            return ClipScorer.load(path).to(device).reward
        raise ValueError(f"{spec}: not an image reward directory (expected a shape-world judge or a CLIP model)")
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"image reward {spec!r}: neither a directory nor 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"image reward {spec!r}: cannot import it ({exc})") from None


def brightness_reward(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """A stated aesthetic property as a toy reward: the mean brightness of each image (-1 black .. 1
    white), whatever the caption. Differentiable; for smoke runs and tests of the machinery."""
    return images.float().mean(dim=(1, 2, 3))
