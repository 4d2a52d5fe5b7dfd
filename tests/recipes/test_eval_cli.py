"""`alignkit eval` and `alignkit build-data` through the real CLI."""

import json

from tests.conftest import run_cli


def test_eval_reports_oracle_metrics_win_rate_and_kl(tmp_path):
    model = tmp_path / "sft"
    assert (
        run_cli(
            "run", "sft", "--config", "tiny", f"output_dir={model}", "train.max_steps=20", "data.validation=null"
        ).returncode
        == 0
    )
    out = tmp_path / "eval"
    result = run_cli(
        "eval",
        "--model",
        str(model / "final"),
        "--reference",
        str(model / "final"),
        "--prompts",
        "builtin:eval?n=24&seed=1",
        "--out",
        str(out),
        "--max-new-tokens",
        "32",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    metrics = report["metrics"]
    assert len(report["items"]) == 24 and (out / "eval.png").is_file()
    assert 0.0 <= metrics["reward_ci_low"] <= metrics["reward"] <= metrics["reward_ci_high"] <= 1.0
    # a model against itself: KL 0 exactly (same log-probs), win rate exactly a coin flip by symmetry of ties
    assert abs(metrics["kl"]) < 1e-3
    assert metrics["win_rate_vs_reference"] == 0.5
    assert "reward" in result.stdout and "harmful_rate" in result.stdout


def test_eval_rejects_non_prompt_data(tmp_path):
    data = tmp_path / "x.jsonl"
    data.write_text('{"text": "hello"}\n')
    result = run_cli("eval", "--model", str(tmp_path), "--prompts", str(data))
    assert result.returncode == 2 and "x.jsonl:1: a prompt record needs a 'prompt'" in result.stderr
    data.write_text('{"messages": [{"role": "user", "content": "hello"}]}\n')  # a prompt, but not the oracle's
    result = run_cli("eval", "--model", str(tmp_path), "--prompts", str(data))
    assert result.returncode == 2 and "x.jsonl:1: expected prompt records with a 'prompt' string" in result.stderr


def test_build_data_writes_every_dataset(tmp_path):
    result = run_cli("build-data", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("pretrain", "sft", "prefs", "attributes", "prompts", "eval_prompts", "redteam"):
        assert (tmp_path / f"{name}.jsonl").stat().st_size > 0
