"""The one-shot sampling paths with `sampling.backend=vllm`, through the real CLI on tiny random
Llamas: `rejection_sampling` (two iterations: a second engine in the same process), iterative
on-policy `dpo`, `alignkit generate` and `alignkit eval` (the last two equal to the native sampler
when greedy). The online recipes: test_vllm_recipes.py."""

from __future__ import annotations

import json

import pytest

from alignkit.models.loading import save_causal_lm
from tests.conftest import run_cli, run_recipe
from tests.recipes.test_vllm_recipes import ARCH, VLLM
from tests.unit.generation.test_vllm_backend import vllm_tiny_model


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rejection_sampling_with_vllm(tmp_path):
    run_recipe(
        "rejection_sampling",
        tmp_path,
        *ARCH,
        *VLLM,
        "rs.iterations=2",  # a second engine in the same process, from iteration 1's model
        "data.train.path=builtin:prompts?n=8",
        "sampling.max_new_tokens=12",
        "train.epochs=1",
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
    )
    for t in (1, 2):
        kept = _rows(tmp_path / f"iteration_{t}/kept.jsonl")
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
