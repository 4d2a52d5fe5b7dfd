from __future__ import annotations

import numpy as np

from alignkit.diffusion.inference import generate_images, load_for_images
from alignkit.diffusion.reward import load_image_reward
from alignkit.diffusion.shapes import render
from alignkit.tasks.shapes import COLOURS, ShapeSpec
from tests.conftest import run_cli


def test_rendering_is_deterministic_and_shows_the_caption():
    spec = ShapeSpec("circle", "yellow", "black")
    a, b = render(spec, np.random.default_rng(3)), render(spec, np.random.default_rng(3))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and (a == b).all()
    colours = a.reshape(-1, 3)
    is_bg = (colours == COLOURS["black"]).all(-1)
    is_fg = (colours == COLOURS["yellow"]).all(-1)
    assert 0.5 < is_bg.mean() < 0.95 and 0.05 < is_fg.mean() < 0.4  # a disc of radius 6-10 in 32x32


def test_shapes_differ_in_area_for_the_same_size():
    rng = lambda: np.random.default_rng(0)  # noqa: E731 - same position, size and angle for each shape
    coverage = {
        s: ((render(ShapeSpec(s, "white", "black"), rng()).mean(-1) - 25) / (240 - 25)).sum()
        for s in ("circle", "square", "triangle")
    }  # pixels covered (white on black)
    # the same circumradius r: circle pi r^2 > square (1.7 r)^2 > equilateral triangle 1.3 r^2
    assert coverage["triangle"] < 0.5 * coverage["square"] < 0.5 * coverage["circle"]


def test_shape_world_command_writes_a_loadable_base_and_judge(tmp_path):
    result = run_cli(
        "shape-world",
        "--out",
        str(tmp_path),
        "--unet-steps",
        "2",
        "--vae-steps",
        "2",
        "--images",
        "64",
        "--judge-images",
        "64",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    pipe = load_for_images(str(tmp_path / "base"), None)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the latents' spread
    images = generate_images(pipe, ["a red circle on blue"], [0, 1], steps=2, guidance=3.0)
    assert images.shape == (1, 2, 3, 32, 32)
    assert load_image_reward(str(tmp_path / "judge"))(images[0], ["a red circle on blue"] * 2).shape == (2,)
