from __future__ import annotations

import pytest
import torch

from alignkit.diffusion.reward import ShapeJudge, render_batch, train_shape_judge
from alignkit.diffusion.shapes import ShapeSpec


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
    torch.testing.assert_close(loaded.reward(images, ["a purple triangle on green"]),
                               judge.reward(images, ["a purple triangle on green"]))
    with pytest.raises(ValueError, match="not a shape-world caption"):
        judge.reward(images, ["a cat"])
