"""Rejection sampling end to end through the real CLI on a tiny random Llama with the oracle."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import run_cli

QUIET = ["logging.progress=none"]


def rs(out, *overrides, ok=True, env=None):
    result = run_cli(
        "run",
        "rejection_sampling",
        "--config",
        "tiny",
        f"output_dir={out}",
        *QUIET,
        *overrides,
        env={"OMP_NUM_THREADS": "1", **(env or {})},
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rs") / "run"
    rs(out)
    return out


def test_iterations_keep_the_best_samples_and_train_on_them(tiny_run):
    rollout = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollout] == [1, 2]
    for r in rollout:
        assert r["rollout/kept"] == 32  # k = 1 of N = 4 for each of the 32 prompts
        assert r["rollout/reward_kept"] >= r["rollout/reward"]  # the best of 4 is at least the mean
        assert 0 < r["rollout/response_tokens"] <= 24 and 0 <= r["rollout/ended_fraction"] <= 1
    kept = [json.loads(x) for x in (tiny_run / "iteration_1/kept.jsonl").read_text().splitlines()]
    assert len(kept) == 32 and {"prompt", "response", "reward"} <= kept[0].keys()
    trained = [json.loads(x) for x in (tiny_run / "iteration_2/metrics.jsonl").read_text().splitlines()]
    assert trained and all("loss" in r for r in trained)
    AutoModelForCausalLM.from_pretrained(tiny_run / "final")
    # the final model is the last iteration's
    a = load_file(str(tiny_run / "final/model.safetensors"))
    b = load_file(str(tiny_run / "iteration_2/final/model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_best_of_n_with_more_samples_raises_the_kept_reward(tmp_path):
    """The oracle's best of 8 beats its best of 1 (= a random sample) on the same prompts."""
    one, eight = tmp_path / "one", tmp_path / "eight"
    rs(one, "rs.iterations=1", "sampling.n=1", "checkpoint.save_final=false")
    rs(eight, "rs.iterations=1", "sampling.n=8", "checkpoint.save_final=false")
    kept = [json.loads((o / "metrics.jsonl").read_text().splitlines()[0])["rollout/reward_kept"] for o in (one, eight)]
    assert kept[1] > kept[0] + 0.01


def test_resume_after_a_kill_reuses_finished_iterations(tiny_run, tmp_path):
    out = tmp_path / "resumed"
    first = rs(out, ok=False, env={"ALIGNKIT_TEST_KILL_AT_STEP": "1"})  # dies in iteration 1's training
    assert first.returncode != 0 and (out / "iteration_1/kept.jsonl").is_file()
    second = rs(out)
    assert "reusing 32 kept samples" in second.stderr
    rollout = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert rollout == straight  # the same samples, the same iteration-2 policy
    a, b = load_file(str(tiny_run / "final/model.safetensors")), load_file(str(out / "final/model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_bad_settings_are_named(tmp_path):
    result = rs(tmp_path / "x", "rs.keep_per_prompt=5", ok=False)
    assert result.returncode == 2 and "rs.keep_per_prompt=5 > sampling.n=4" in result.stderr
    result = rs(tmp_path / "y", "reward.kind=http", ok=False)
    assert result.returncode == 2 and "kind=http needs `url`" in result.stderr


@pytest.mark.distributed
def test_two_processes_share_the_prompts(tiny_run, tmp_path):
    out = tmp_path / "two"
    result = rs(out, "--nproc", "2", "distributed.strategy=ddp", "train.micro_batch_size=4")
    assert "2 processes" in result.stderr
    rollout = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/kept"] for r in rollout] == [32, 32]
    # every prompt sampled by exactly one process, and the shares gathered on both
    one = [json.loads(x) for x in (tiny_run / "iteration_1/kept.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (out / "iteration_1/kept.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in two) == sorted(r["prompt"] for r in one)
    AutoModelForCausalLM.from_pretrained(out / "final")
