"""Reward models end to end through the real CLI on a tiny random Llama.

The new head starts at zero, so every reward is 0 at step 1 and the Bradley-Terry loss is
exactly log 2. Training must then rank held-out pairs well above chance (Bradley-Terry) and
predict an attribute that depends on the response (regression: verbosity).
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from alignkit.models.reward import RewardModelInfo
from tests.conftest import run_cli

ENV = {"OMP_NUM_THREADS": "1"}
QUIET = ["logging.tensorboard=false", "logging.progress=none"]


def rm(out, *overrides, config="tiny", ok=True, env=None):
    result = run_cli(
        "run", "reward_model", "--config", config, f"output_dir={out}", *QUIET, *overrides, env={**ENV, **(env or {})}
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def rows(out, key="loss"):
    return [r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def bt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "bt"
    rm(out)
    return out


def test_bradley_terry_ranks_held_out_pairs(bt_run, tmp_path):
    train = rows(bt_run)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero head: every reward 0
    assert train[0]["rewards/std"] == pytest.approx(0, abs=1e-6)
    assert statistics.mean(r["accuracy"] for r in train[-5:]) > statistics.mean(r["accuracy"] for r in train[:5]) + 0.2
    report = json.loads((bt_run / "eval.json").read_text())
    assert report["pairwise_accuracy"] > 0.65 and report["pairs"] == 64
    # the loop's validation accuracy (sums over micro-batches) and the exact report agree
    assert rows(bt_run, "val/loss")[-1]["val/accuracy"] == pytest.approx(report["pairwise_accuracy"])

    model = AutoModelForSequenceClassification.from_pretrained(bt_run / "final")
    info = RewardModelInfo.from_config(model.config)
    assert info.attributes == ["reward"] and info.weights == [1.0]
    assert info.mean == pytest.approx(report["reward_mean"]) and info.std == pytest.approx(report["reward_std"])
    assert info.std > 0.1

    # `alignkit score` on the same pairs gives the same ranking
    out = tmp_path / "scored.jsonl"
    result = run_cli(
        "score", "--model", str(bt_run / "final"), "--data", "builtin:prefs?n=64&seed=1&split=valid", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert f"pairwise accuracy {report['pairwise_accuracy']:.4f}" in result.stdout
    first = json.loads(out.read_text().splitlines()[0])
    assert {"chosen_score", "rejected_score", "prompt"} <= first.keys()


@pytest.mark.parametrize("loss_type, compare", [("margin_bt", "above"), ("scaled_bt", "below")])
def test_margin_and_scaled_bt(tmp_path, loss_type, compare):
    """At step 1 (all rewards 0): margin_bt = mean log(1 + e^m) > log 2; scaled_bt = log 2 * mean(m)
    < log 2 since the task world's margins are in (0, 1]."""
    out = tmp_path / loss_type
    rm(out, f"loss.type={loss_type}", "train.max_steps=3", "data.validation=null", "checkpoint.save_final=false")
    first = rows(out)[0]["loss"]
    assert (first > math.log(2) + 0.01) if compare == "above" else (0 < first < math.log(2) - 0.01)


def test_margin_loss_without_margins_names_the_record(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    result = rm(tmp_path / "x", "loss.type=margin_bt", f"data.train.path={data}", "data.validation=null", ok=False)
    assert result.returncode == 2 and "pairs.jsonl:1: loss.type=margin_bt needs a 'margin' field" in result.stderr
    assert "Traceback" not in result.stderr


def test_regression_learns_the_attributes(tmp_path):
    out = tmp_path / "reg"
    rm(out, config="tiny_regression")
    train = rows(out)
    assert set(train[0]) >= {f"mse/{a}" for a in ("helpfulness", "verbosity", "politeness")}
    report = json.loads((out / "eval.json").read_text())
    assert report["pearson/verbosity"] > 0.3  # verbosity follows the response's length
    assert sum(report[k] > 0.15 for k in report if k.startswith("pearson/")) >= 4

    # The head starts at the labels' means: the first loss is about the labels' variance, far
    # below a zero head's (mean square of 0-4 labels).
    zero = tmp_path / "zero"
    rm(
        zero,
        "init_head_to_mean=false",
        "train.max_steps=1",
        "data.validation=null",
        "checkpoint.save_final=false",
        "normalization_samples=0",
        config="tiny_regression",
    )
    assert rows(zero)[0]["loss"] > 3 * train[0]["loss"]
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert len(model.config.id2label) == 7 and model.config.reward_weights == [pytest.approx(1 / 7)] * 7

    scored = tmp_path / "scored.jsonl"
    result = run_cli(
        "score", "--model", str(out / "final"), "--data", "builtin:attributes?n=4&seed=2", "--out", str(scored)
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(scored.read_text().splitlines()[0])
    assert set(record["score_attributes"]) == set(model.config.id2label.values())
    assert record["attributes"]  # the record's own labels are kept
    assert record["score"] == pytest.approx(statistics.mean(record["score_attributes"].values()), rel=1e-4)


def test_resume_after_sigkill_matches_uninterrupted_run(bt_run, tmp_path):
    out = tmp_path / "resumed"
    first = rm(out, ok=False, env={"ALIGNKIT_TEST_KILL_AT_STEP": "25"})
    assert first.returncode != 0 and (out / "checkpoints/step_20/COMPLETE").is_file()
    second = rm(out)
    assert "resumed from" in second.stderr
    assert [r["loss"] for r in rows(out)] == pytest.approx([r["loss"] for r in rows(bt_run)], rel=1e-5)
    a, b = load_file(str(bt_run / "final/model.safetensors")), load_file(str(out / "final/model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_lora_reward_model_saves_a_plain_classifier(tmp_path):
    out = tmp_path / "lora"
    rm(out, "model.lora.enabled=true", "model.lora.r=4", "train.max_steps=6", "data.validation=null")
    assert rows(out)[-1]["loss"] < math.log(2)
    weights = load_file(str(out / "final/model.safetensors"))
    assert "score.weight" in weights and not any("lora" in k or "modules_to_save" in k for k in weights)
    AutoModelForSequenceClassification.from_pretrained(out / "final")


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["tiny", "tiny_regression"])
def test_two_processes_match_one(tmp_path, config):
    """FSDP over 2 gloo processes: the same losses, the same exact validation report (scored
    in shares by both processes) and the same saved head as 1 process."""
    common = ["train.max_steps=6", "train.eval_every=null", "checkpoint.every=null", "normalization_samples=32"]
    two, one = tmp_path / "two", tmp_path / "one"
    result = rm(two, *common, "--nproc", "2", config=config)
    assert "2 processes" in result.stderr
    rm(one, *common, config=config)
    keys = ["loss", "accuracy", "rewards/margin"] if config == "tiny" else ["loss", "mse/verbosity"]
    assert [r[k] for r in rows(two) for k in keys] == pytest.approx(
        [r[k] for r in rows(one) for k in keys], rel=1e-4, abs=1e-5
    )
    report_two, report_one = (json.loads((o / "eval.json").read_text()) for o in (two, one))
    # The weights after 6 steps agree to ~1e-4 (FSDP reduces gradients in another order; checked
    # below), so each reward agrees to ~1e-4 absolute and a statistic of rewards to a few 1e-4:
    # a relative bound on a small std (0.08) would ask more than fp32 training can promise.
    assert report_two == pytest.approx(report_one, rel=2e-3, abs=1e-3)
    a, b = load_file(str(one / "final/model.safetensors")), load_file(str(two / "final/model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
