"""DRaFT+ end to end through the real CLI on the tiny random pipeline (`configs/draftp/tiny.yaml`),
with the brightness reward (a stated, learnable property: the tiny model's images get brighter)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignkit.training.checkpoint import read_model_state
from tests.conftest import read_metrics as metrics
from tests.conftest import run_cli, run_recipe

FAST = ["checkpoint.every=null"]


def draftp(out, *overrides, ok=True, env=None, nproc=None):
    return run_recipe("draftp", out, *overrides, ok=ok, env=env, nproc=nproc)


def lora_weights(out):
    return load_file(out / "final" / "pytorch_lora_weights.safetensors")


def test_draftp_raises_the_reward_and_saves_loadable_adapters(tmp_path):
    out = tmp_path / "run"
    draftp(out, *FAST, "draftp.steps=6", "draftp.val_every=null")
    m = metrics(out)
    assert [r["step"] for r in m] == [0, 1, 2, 3, 4, 5, 6]
    base, final = m[0], m[-1]
    assert m[1]["regularizer"] == 0.0  # LoRA starts at B = 0: the initial model exactly
    assert final["regularizer"] > 0
    assert final["val/reward"] > base["val/reward"] + 0.05, (base, final)  # same prompts and seeds
    assert (out / "validation" / "step_0.png").is_file() and (out / "validation" / "step_6.json").is_file()
    info = json.loads((out / "final" / "alignkit.json").read_text())
    assert info["kind"] == "draftp_lora" and info["base"] == str((out / "base").resolve())

    # diffusers itself loads the result: base pipeline + LoRA adapters
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        out / "base", safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.load_lora_weights(str(out / "final"))

    # and `alignkit generate-images` samples it, annealed or not, scoring the grid
    rewards = {}
    for schedule in ("base", "linear", "draft"):
        grid = tmp_path / f"{schedule}.png"
        result = run_cli(
            "generate-images",
            "--lora",
            str(out / "final"),
            "--prompt",
            "a red circle on blue",
            "--prompt",
            "a blue square on white",
            "--n",
            "2",
            "--steps",
            "6",
            "--guidance",
            "3",
            "--schedule",
            schedule,
            "--reward",
            "alignkit.diffusion.reward:brightness_reward",
            "--out",
            str(grid),
        )
        assert result.returncode == 0, result.stderr
        summary = json.loads(grid.with_suffix(".json").read_text())
        assert grid.is_file() and len(summary["rewards"]) == 2 and summary["diversity"] > 0
        rewards[schedule] = summary["reward"]
    assert rewards["base"] < rewards["linear"] < rewards["draft"], rewards


def test_kl_coeff_zero_is_plain_draft_and_moves_further(tmp_path):
    runs = {}
    for kl in (0.0, 1000.0):
        runs[kl] = tmp_path / f"kl{kl}"
        draftp(runs[kl], *FAST, "draftp.steps=4", f"draftp.kl_coeff={kl}", "draftp.val_every=null")
    plain, regularised = metrics(runs[0.0])[-1], metrics(runs[1000.0])[-1]
    assert plain["loss"] == pytest.approx(-plain["reward"], abs=1e-6)  # no penalty in the loss
    assert regularised["regularizer"] < plain["regularizer"]


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["draftp.steps=4", "checkpoint.every=2", "draftp.val_every=null"]
    draftp(whole, *args)
    assert draftp(killed, *args, ok=False, env={"ALIGNKIT_TEST_KILL_AT_STEP": "3"}).returncode != 0
    assert (killed / "checkpoints" / "step_2").is_dir()
    state = read_model_state(killed / "checkpoints" / "step_2", "unet")
    assert state and all("lora_" in k for k in state)  # the adapters only
    draftp(killed, *args)
    a, b = metrics(whole), metrics(killed)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in x:
            if not key.startswith("timing/"):
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key
    for key, value in lora_weights(whole).items():
        torch.testing.assert_close(value, lora_weights(killed)[key])


def test_two_processes_make_the_same_update_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["draftp.steps=2", "checkpoint.every=null", "draftp.val_every=null", "train.micro_batch_size=1"]
    draftp(one, *args)
    draftp(two, *args, nproc=2)
    a, b = metrics(one), metrics(two)
    assert a[-1]["reward"] == pytest.approx(b[-1]["reward"], rel=1e-4)
    for key, value in lora_weights(one).items():
        torch.testing.assert_close(value, lora_weights(two)[key], atol=1e-6, rtol=1e-4)


def test_bad_input_is_named(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle on blue"}\n{"prompt": "' + "very " * 30 + 'red circle"}\n')
    result = draftp(tmp_path / "long", f"prompts.path={prompts}", ok=False)
    assert result.returncode != 0 and f"{prompts}:2" in result.stderr and "at most 16" in result.stderr
    result = draftp(tmp_path / "k", "sampling.truncation_steps=9", ok=False)
    assert "truncation_steps=9 exceeds sampling.steps=6" in result.stderr
    result = draftp(tmp_path / "m", "model.tiny=false", ok=False)
    assert "exactly one of `path`" in result.stderr


def test_generate_images_reports_bad_requests(tmp_path):
    from alignkit.diffusion.pipeline import build_tiny_pipeline, save_pipeline

    base = save_pipeline(build_tiny_pipeline(seed=0), tmp_path / "base")
    args = [
        "generate-images",
        "--prompt",
        "a red circle on blue",
        "--n",
        "1",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "grid.png"),
    ]
    result = run_cli(*args, "--model", str(base), "--schedule", "linear")
    assert result.returncode != 0 and "needs --lora" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_cli(*args, "--lora", str(tmp_path / "empty"))
    assert result.returncode != 0 and "no alignkit.json" in result.stderr
    result = run_cli(*args, "--model", str(base), "--lora", str(tmp_path / "empty"))
    assert result.returncode != 0 and "no pytorch_lora_weights.safetensors" in result.stderr
    result = run_cli(*args, "--model", str(base))  # the base pipeline alone
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "grid.json").is_file()
