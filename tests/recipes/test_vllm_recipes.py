"""Every sampling path with `sampling.backend=vllm`, through the real CLI on tiny random Llamas:
`ppo`, `reinforce` (GRPO, with truncated importance sampling), `rejection_sampling`, `steerlm2`,
iterative on-policy `dpo`, `alignkit generate` and `alignkit eval`. vLLM's CPU attention needs a
head size of at least 32: the models here have 2 heads of 32. Each run builds its own in-process
engine (~15 s); the RL runs check that the engine's log-probs of the sampled tokens equal the
trainer's recomputation after every weight push (fp32 both: to ~1e-5)."""

from __future__ import annotations

import json

import pytest

from alignkit.models.loading import save_causal_lm
from tests.conftest import read_metrics, run_cli, run_recipe
from tests.unit.generation.test_vllm_backend import vllm_tiny_model

ARCH = ["model.random_init.hidden_size=64", "model.random_init.num_heads=2", "model.random_init.num_kv_heads=1"]
VLLM = ["sampling.backend=vllm", "sampling.vllm.max_model_len=512"]


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


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


def test_rejection_sampling_with_vllm(tmp_path):
    run_recipe(
        "rejection_sampling",
        tmp_path,
        *ARCH,
        *VLLM,
        "rs.iterations=1",
        "data.train.path=builtin:prompts?n=8",
        "sampling.max_new_tokens=12",
        "train.epochs=1",
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
    )
    kept = _rows(tmp_path / "iteration_1/kept.jsonl")
    assert len(kept) == 8 and all(isinstance(r["response"], str) for r in kept)


def test_online_dpo_with_vllm(tmp_path):
    run_recipe(
        "dpo",
        tmp_path,
        *ARCH,
        "online.sampling.backend=vllm",
        "online.iterations=1",
        "train.max_steps=2",
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
        "online.sampling.max_new_tokens=24",
        "data.train.path=builtin:prompts?n=16",
        "data.validation=null",
        config="tiny_online",
    )
    assert (tmp_path / "iteration_1/pairs.jsonl").is_file() and (tmp_path / "final").is_dir()


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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    model = vllm_tiny_model(tokenizer, seed=1)
    return save_causal_lm(model, model.state_dict(), tokenizer, tmp_path_factory.mktemp("vllm") / "lm")


def test_generate_with_vllm_equals_native_greedy(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello", "what is 2+2?", "hi")))
    rows = {}
    for backend in ("native", "vllm"):
        out = tmp_path / f"{backend}.jsonl"
        args = ["--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--n", "2"]
        result = run_cli("generate", *args, "--temperature", "0", "--max-new-tokens", "12", "--backend", backend)
        assert result.returncode == 0, result.stderr
        rows[backend] = _rows(out)
    keys = ("prompt", "sample", "response", "is_end", "finish_reason", "num_tokens")
    assert [[r[k] for k in keys] for r in rows["vllm"]] == [[r[k] for k in keys] for r in rows["native"]]
    for a, b in zip(rows["vllm"], rows["native"]):
        assert abs(a["logprob"] - b["logprob"]) < 1e-3


def test_eval_with_vllm_equals_native_greedy(model_dir, tmp_path):
    reports = {}
    for backend in ("native", "vllm"):
        out = tmp_path / backend
        args = ["--model", str(model_dir), "--prompts", "builtin:eval?n=6&seed=1", "--out", str(out)]
        result = run_cli("eval", *args, "--temperature", "0", "--max-new-tokens", "12", "--backend", backend)
        assert result.returncode == 0, result.stderr
        reports[backend] = json.loads((out / "eval.json").read_text())
    assert [i["response"] for i in reports["vllm"]["items"]] == [i["response"] for i in reports["native"]["items"]]
