"""The online recipes with `sampling.backend=vllm`, through the real CLI on tiny random Llamas: `ppo`,
`reinforce` (GRPO, with truncated importance sampling; on 1 and 2 processes) and `steerlm2`; the
one-shot paths are in test_vllm_sampling_paths.py (a module of its own: xdist's loadscope runs the
two on different workers). vLLM's CPU attention needs a head size of at least 32: the models here
have 2 heads of 32. Each run builds its own in-process engine (~15 s); the RL runs check that the
engine's log-probs of the sampled tokens equal the trainer's recomputation after every weight push
(fp32 both: to ~1e-6)."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_recipe

ARCH = ["model.random_init.hidden_size=64", "model.random_init.num_heads=2", "model.random_init.num_kv_heads=1"]
VLLM = ["sampling.backend=vllm", "sampling.vllm.max_model_len=512"]


def _engine_matches_trainer(metrics: list[dict]) -> None:
    """Every step's engine-vs-trainer gap is float noise: step 2 on samples from pushed weights."""
    assert len(metrics) >= 2
    for m in metrics:
        assert m["rollout/logprob_abs_diff_max"] < 1e-3, m
        assert m["timing/weight_sync_s"] < 5.0


def test_ppo_with_vllm(tmp_path):
    run_recipe("ppo", tmp_path, *ARCH, *VLLM, "ppo.steps=2", "checkpoint.every=null", "checkpoint.save_final=false")
    _engine_matches_trainer(read_metrics(tmp_path))


def test_grpo_with_vllm_and_truncated_importance_sampling(tmp_path):
    run_recipe(
        "reinforce",
        tmp_path,
        *ARCH,
        *VLLM,
        "reinforce.estimator=grpo",
        "reinforce.steps=2",
        "rollout.tis_cap=2.0",
        "checkpoint.every=null",
        "checkpoint.save_final=false",
    )
    metrics = read_metrics(tmp_path)
    _engine_matches_trainer(metrics)
    assert all(m["rollout/logprob_abs_diff_mean"] <= m["rollout/logprob_abs_diff_max"] for m in metrics)


@pytest.mark.distributed
def test_grpo_with_vllm_on_two_processes(tmp_path):
    """Under torchrun each rank owns an in-process engine for its share of the prompts (vLLM joins
    the trainer's gloo group as a world of single-rank tensor-parallel groups)."""
    run_recipe(
        "reinforce",
        tmp_path,
        *ARCH,
        *VLLM,
        "reinforce.estimator=grpo",
        "reinforce.steps=2",
        "checkpoint.every=null",
        "checkpoint.save_final=false",
        nproc=2,
    )
    metrics = read_metrics(tmp_path)
    _engine_matches_trainer(metrics)
    assert all(m["rollout/samples"] == 32 for m in metrics)


def test_steerlm2_with_vllm(tmp_path):
    steerlm = tmp_path / "steerlm"
    run_recipe("steerlm", steerlm, *ARCH, "train.max_steps=4", "train.eval_every=null")
    out = tmp_path / "steerlm2"
    run_recipe(
        "steerlm2",
        out,
        *VLLM,
        f"model.path={steerlm}/final",
        f"steerlm2.prior_path={steerlm}/final",
        "steerlm2.iterations=1",
        "data.train.path=builtin:steer?n=4&seed=0",
    )
    assert (out / "final").is_dir()
