from __future__ import annotations

import pytest
import torch

from alignkit.diffusion.reward import (
    ClipScorer,
    ShapeJudge,
    brightness_reward,
    load_image_reward,
    render_batch,
    train_shape_judge,
)
from alignkit.tasks.shapes import ShapeSpec


@pytest.fixture(scope="module")
def judge_and_report():
    return train_shape_judge(n=1500, epochs=3, held_out=300)


def test_the_judge_learns_the_shape_world(judge_and_report):
    _, report = judge_and_report
    assert report["accuracy/colour"] > 0.95 and report["accuracy/background"] > 0.95
    assert report["accuracy/shape"] > 0.8
    assert report["reward/matching"] > 0.8


def test_the_reward_prefers_the_caption_and_is_differentiable(judge_and_report):
    judge, _ = judge_and_report
    specs = [ShapeSpec("circle", "red", "white"), ShapeSpec("square", "blue", "yellow")]
    images = render_batch(specs, seed=99).requires_grad_(True)
    right = judge.reward(images, [s.caption for s in specs])
    wrong = judge.reward(images, ["a green triangle on black", "a yellow circle on blue"])
    assert (right > wrong + 0.5).all()
    right.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_save_and_load_round_trip(judge_and_report, tmp_path):
    judge, _ = judge_and_report
    loaded = ShapeJudge.load(judge.save(tmp_path / "judge"))
    images = render_batch([ShapeSpec("triangle", "purple", "green")], seed=1)
    torch.testing.assert_close(
        loaded.reward(images, ["a purple triangle on green"]), judge.reward(images, ["a purple triangle on green"])
    )
    with pytest.raises(ValueError, match="not a shape-world caption"):
        judge.reward(images, ["a cat"])


def tiny_clip(directory):
    """A random CLIP checkpoint (model + tokenizer) saved like a downloaded one."""
    from transformers import CLIPConfig, CLIPModel

    from alignkit.diffusion.pipeline import shape_tokenizer

    tokenizer = shape_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_clip_scorer_loads_from_a_directory_and_is_differentiable(tmp_path):
    reward = load_image_reward(str(tiny_clip(tmp_path / "clip")))
    images = torch.zeros(2, 3, 32, 32, requires_grad=True)
    scores = reward(images, ["a red circle on blue", "a green square on white"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad.abs().sum() > 0  # the gradient reaches the pixels through resize and normalise
    # PickScore's form: exp(logit_scale) * cosine, so |score| <= exp(logit_scale)
    logit_scale = float(ClipScorer.load(tmp_path / "clip").model.logit_scale.exp())
    assert float(scores.detach().abs().max()) <= logit_scale + 1e-4


def test_load_image_reward_kinds_and_errors(tmp_path, judge_and_report):
    judge, _ = judge_and_report
    judge.save(tmp_path / "judge")
    images = render_batch([ShapeSpec("circle", "red", "blue")], seed=0)
    assert float(load_image_reward(str(tmp_path / "judge"))(images, ["a red circle on blue"])[0]) > 0.5
    assert load_image_reward("alignkit.diffusion.reward:brightness_reward") is brightness_reward
    assert float(brightness_reward(torch.ones(1, 3, 4, 4), ["x"])[0]) == 1.0
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not an image reward directory"):
        load_image_reward(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="cannot import"):
        load_image_reward("alignkit.diffusion.reward:nothing_here")
    with pytest.raises(ValueError, match="neither a directory"):
        load_image_reward("no/such/dir")


def test_save_grid_writes_one_png_of_rows_and_columns(tmp_path):
    from PIL import Image

    from alignkit.diffusion.images import save_grid

    path = save_grid(torch.zeros(2, 3, 3, 8, 8), tmp_path / "grid.png", scale=2, labels=["one", "two"], gap=1)
    width, height = Image.open(path).size
    assert (width, height) == (3 * (16 + 1) + 1, 2 * (16 + 1 + 12) + 1)
