"""`alignkit generate` through the real CLI on a tiny saved model."""

from __future__ import annotations

import json

from alignkit.config import SamplingConfig
from alignkit.generation.sampler import generate, stop_token_ids
from alignkit.models.loading import save_causal_lm
from tests.conftest import run_cli, tiny_model

SAMPLING = SamplingConfig(max_new_tokens=4, temperature=0)


def test_generate_writes_n_samples_per_prompt(tmp_path, tokenizer):
    model = tiny_model(tokenizer, seed=1)
    model_dir = save_causal_lm(model, model.state_dict(), tokenizer, tmp_path / "lm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    out = tmp_path / "samples.jsonl"
    result = run_cli(
        "generate",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--n",
        "2",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and [r["sample"] for r in rows] == [0, 1, 0, 1]
    assert rows[0]["prompt"] == "hello" and rows[2]["prompt"] == [{"role": "user", "content": "hi"}]
    assert rows[0]["response"] == rows[1]["response"]  # greedy: both samples alike
    assert all(r["num_tokens"] <= 8 and r["finish_reason"] in ("eos", "length") for r in rows)
    assert "wrote 4 samples for 2 prompts" in result.stdout


def test_generate_reports_bad_input(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": "x"}) + "\n")
    result = run_cli("generate", "--model", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "prompts.jsonl:1: a prompt record needs a 'prompt'" in result.stderr
    prompts.write_text(json.dumps({"prompt": "x"}) + "\n")
    result = run_cli("generate", "--model", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no config.json" in result.stderr and "Traceback" not in result.stderr


def test_a_model_without_a_chat_template_continues_plain_text(tmp_path, tokenizer):
    import copy

    plain = copy.copy(tokenizer)
    plain.chat_template = None
    model = tiny_model(tokenizer, seed=1)
    model_dir = save_causal_lm(model, model.state_dict(), plain, tmp_path / "base")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    out = tmp_path / "samples.jsonl"
    args = ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--temperature", "0"]
    result = run_cli(*args, "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    ids = [tokenizer("hello", add_special_tokens=False)["input_ids"]]
    direct = generate(model.eval(), ids, SAMPLING, stop_token_ids(model, tokenizer), 0, tokenizer.decode)
    assert json.loads(out.read_text())["response"] == direct[0].text
    prompts.write_text(
        json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    result = run_cli(*args)
    assert result.returncode == 2 and "prompts.jsonl:2: the model has no chat template" in result.stderr
    result = run_cli(*args, "--temperature", "-1")
    assert result.returncode == 2 and "temperature" in result.stderr and "Traceback" not in result.stderr
