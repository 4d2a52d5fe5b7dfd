"""DPO and its variants end to end through the real CLI on a tiny random Llama.

The policy starts as its own reference, so at step 1 every implicit reward is 0 and the DPO
loss is exactly log 2. Training must then separate chosen from rejected: the implicit reward
accuracy climbs well above chance, on the training batches and on held-out pairs, and the
reward margin grows.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import run_cli

ENV = {"OMP_NUM_THREADS": "1"}  # shared cores: one BLAS thread per run
QUIET = ["logging.tensorboard=false", "logging.progress=none"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(out):
    return [r for r in metrics(out) if "loss" in r]


def val_rows(out):
    return [r for r in metrics(out) if "val/loss" in r]


def dpo(out, *overrides):
    result = run_cli("run", "dpo", "--config", "tiny", f"output_dir={out}", *QUIET, *overrides, env=ENV)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    out = root / "run"
    return out, root / "cache", dpo(out, f"reference.cache_dir={root / 'cache'}")


def test_dpo_learns_the_preferences(cached_run):
    out, cache, result = cached_run
    assert "computing reference log-probs for" in result.stderr
    assert "step-0 check: policy and reference log-probs agree" in result.stderr
    assert len(list(cache.glob("train-*.safetensors"))) == 1
    assert len(list(cache.glob("validation-*.safetensors"))) == 1

    train = train_rows(out)
    assert [r["step"] for r in train] == list(range(1, 41))
    first = train[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert first["rewards/margin"] == pytest.approx(0, abs=1e-5)
    assert first["sft_loss"] > 0 and first["preference_loss"] == pytest.approx(first["loss"])

    def mean(key, rows):
        return statistics.mean(r[key] for r in rows)

    assert mean("rewards/accuracy", train[-5:]) > 0.8 > mean("rewards/accuracy", train[:5]) + 0.2
    assert mean("rewards/margin", train[-5:]) > 1.0 > 0.3 > mean("rewards/margin", train[:5])
    val = val_rows(out)
    assert [r["step"] for r in val] == [20, 40]
    assert val[-1]["val/rewards/accuracy"] > 0.65
    assert val[-1]["val/rewards/margin"] > 0.5

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.config.num_hidden_layers == 2


def test_second_run_reuses_the_reference_cache(cached_run, tmp_path):
    out, cache, _ = cached_run
    again = tmp_path / "again"
    result = dpo(
        again,
        f"reference.cache_dir={cache}",
        "train.max_steps=3",
        "data.validation=null",
        "checkpoint.save_final=false",
    )
    assert "reusing cached reference log-probs for train" in result.stderr
    assert "computing reference" not in result.stderr
    keys = ["loss", "rewards/margin", "rewards/accuracy"]
    # Same first step (the cosine schedule differs later: 3 steps, not 40).
    assert [train_rows(again)[0][k] for k in keys] == pytest.approx([train_rows(out)[0][k] for k in keys], abs=1e-6)


def test_resume_matches_the_uninterrupted_run(cached_run, tmp_path):
    out, cache, _ = cached_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_40")
    shutil.rmtree(resumed / "final")
    result = dpo(resumed, f"reference.cache_dir={cache}")
    assert "step 20 of 40" in result.stderr and "computing reference" not in result.stderr
    keys = ["loss", "rewards/margin"]
    assert [r[k] for r in train_rows(resumed) for k in keys] == pytest.approx(
        [r[k] for r in train_rows(out) for k in keys], rel=1e-6, abs=1e-7
    )


def test_online_reference_matches_cached(cached_run, tmp_path):
    out, _, _ = cached_run
    online = tmp_path / "online"
    result = dpo(
        online,
        "reference.mode=online",
        "train.max_steps=40",
        "data.validation=null",
        "checkpoint.every=null",
        "checkpoint.save_final=false",
    )
    assert "computing reference" not in result.stderr
    keys = ["loss", "rewards/chosen", "rewards/rejected"]
    for a, b in zip(train_rows(online)[:10], train_rows(out)[:10]):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-4, abs=1e-5), a["step"]


@pytest.mark.parametrize(
    "loss_type, overrides, step1_loss",
    [
        ("ipo", ["loss.beta=0.5"], 1.0),  # (0 - 1/(2 beta))^2
        ("dpo", ["loss.label_smoothing=0.1", "loss.sft_weight=0.1"], None),  # cDPO + RPO-style SFT term
        ("rpo_sq", [], None),
        ("simpo", [], None),
        ("orpo", [], None),
    ],
)
def test_loss_types(tmp_path, loss_type, overrides, step1_loss):
    out = tmp_path / loss_type
    result = dpo(
        out,
        f"loss.type={loss_type}",
        *overrides,
        "train.max_steps=4",
        "data.validation=null",
        "checkpoint.every=null",
        "checkpoint.save_final=false",
    )
    rows = train_rows(out)
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    first = rows[0]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
        "sft_loss",
        "preference_loss",
    ):
        assert key in first
    reference_free = loss_type in ("simpo", "orpo")
    assert ("computing reference" in result.stderr) != reference_free
    if step1_loss is not None:
        assert first["loss"] == pytest.approx(step1_loss, rel=1e-4)  # float32 sums of ~300 log-probs
    if loss_type == "dpo":  # 0.9 * log 2 + 0.1 * log 2 (smoothing is symmetric at 0) + 0.1 * NLL
        assert first["loss"] == pytest.approx(math.log(2) + 0.1 * first["sft_loss"], rel=1e-5)
    if loss_type == "rpo_sq":  # (0 - (r_c - r_r))^2 averaged over the batch's pairs: positive
        assert first["rewards/margin"] == pytest.approx(0, abs=1e-5) and first["loss"] > 0
    if loss_type == "orpo":  # ORPO = NLL(chosen) + odds-ratio term
        assert first["loss"] == pytest.approx(first["sft_loss"] + first["preference_loss"], rel=1e-5)
    if loss_type == "simpo":  # reference-free rewards: beta * mean log-prob, not 0 at step 1
        assert first["rewards/chosen"] == pytest.approx(0.1 * first["logps/chosen"], rel=1e-5)
        assert first["sft_loss"] == pytest.approx(-first["logps/chosen"], rel=1e-5)


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_lora_reference_is_the_base_model(tmp_path, mode):
    out = tmp_path / mode
    result = dpo(
        out,
        "model.lora.enabled=true",
        "optim.lr=1e-2",
        f"reference.mode={mode}",
        "train.max_steps=12",
        "data.validation=null",
        "checkpoint.every=null",
    )
    assert ("computing reference" in result.stderr) == (mode == "cached")
    assert "step-0 check: policy and reference log-probs agree" in result.stderr
    rows = train_rows(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert statistics.mean(r["rewards/margin"] for r in rows[-4:]) > 0.1  # adapters moved, reference did not
    state = load_file(str(out / "final" / "model.safetensors"))
    assert not any("lora" in k for k in state)  # merged on save
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.num_hidden_layers == 2


def test_rpo_without_rewards_names_the_record(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b", "chosen_reward": 1}) + "\n")
    result = run_cli(
        "run",
        "dpo",
        "--config",
        "tiny",
        f"output_dir={tmp_path / 'out'}",
        "loss.type=rpo_fwd_kl",
        f"data.train.path={data}",
        "data.validation=null",
        *QUIET,
        env=ENV,
    )
    assert result.returncode != 0
    assert f"{data}:1: missing rejected_reward" in result.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["cached", "online"])
def test_two_processes_match_one(tmp_path, mode):
    """online: the frozen reference is sharded by FSDP beside the policy on 2 processes."""
    short = ["train.max_steps=6", "data.validation=null", "checkpoint.every=null", "checkpoint.save_final=false"]
    two = tmp_path / "two"
    result = dpo(two, *short, f"reference.mode={mode}", "--nproc", "2")
    assert "2 processes" in result.stderr
    one = tmp_path / "one"
    dpo(one, *short, f"reference.mode={mode}")
    # Loss and margin are sums of fp32 log-probs reduced in another order on 2 processes: equal to
    # ~1e-6 relative. Accuracy is a count of pairs: a pair whose margin sits within rounding of the
    # tie tolerance may flip, so it may differ by one pair (1/8) at a step, never more.
    keys = ["loss", "rewards/margin"]
    assert [r[k] for r in train_rows(two) for k in keys] == pytest.approx(
        [r[k] for r in train_rows(one) for k in keys], rel=1e-4, abs=1e-5
    )
    accuracy = [(a["rewards/accuracy"], b["rewards/accuracy"]) for a, b in zip(train_rows(two), train_rows(one))]
    assert all(abs(a - 0.5) <= 1 / 8 for a in accuracy[0])  # step 0: policy == reference, ties
    assert all(abs(a - b) <= 1 / 8 + 1e-9 for a, b in accuracy)


def test_step0_check_warns_when_policy_and_reference_differ(tokenizer):
    """The check itself, in process: a reference that is not the policy is reported loudly."""
    from types import SimpleNamespace

    from alignkit.config import load_config
    from alignkit.data.preference import load_preference_pairs
    from alignkit.recipes import dpo as recipe
    from alignkit.training.logging import get_logger
    from tests.conftest import REPO, tiny_model

    cfg = load_config(
        recipe.Config, REPO / "configs/dpo/tiny.yaml", ["output_dir=/nonexistent", "data.validation=null"]
    )
    pairs, _ = load_preference_pairs(
        cfg.data.train.model_copy(update={"path": "builtin:prefs?n=4"}), cfg.data, tokenizer
    )
    run = SimpleNamespace(
        dist=SimpleNamespace(device=torch.device("cpu")),
        log=get_logger(),
        autocast=lambda: torch.autocast("cpu", enabled=False),
    )
    policy = tiny_model(tokenizer, seed=0)
    # A handler of our own on the alignkit logger: caplog depends on propagation and on what
    # other tests left attached to the root logger.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    get_logger().addHandler(handler)
    try:
        assert recipe._check_step0(run, cfg, policy, tiny_model(tokenizer, seed=0), pairs, 0) == 0
        diff = recipe._check_step0(run, cfg, policy, tiny_model(tokenizer, seed=1), pairs, 0)
    finally:
        get_logger().removeHandler(handler)
    assert diff > 1e-3
    warnings = [r for r in records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "differ at step 0 by up to" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "loss_type", ["dpo", "ipo", "hinge", "robust", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "simpo", "orpo"]
)
def test_every_loss_type_in_process(tokenizer, loss_type):
    """loss_fn on a micro-batch with cached reference log-probs and an evaluation filler: finite
    loss and metrics, gradients reach the policy; a filler-only batch gives zeros."""
    from alignkit.config import load_config
    from alignkit.data.preference import collate_pairs, load_preference_pairs
    from alignkit.recipes import dpo as recipe
    from tests.conftest import REPO, tiny_model

    cfg = load_config(
        recipe.Config,
        REPO / "configs/dpo/tiny.yaml",
        ["output_dir=/nonexistent", f"loss.type={loss_type}", "loss.sft_weight=0.5"],
    )
    pairs, _ = load_preference_pairs(
        cfg.data.train.model_copy(update={"path": "builtin:prefs?n=3"}), cfg.data, tokenizer, require_rewards=True
    )
    model = tiny_model(tokenizer)
    batch = collate_pairs(pairs, 0)
    with torch.no_grad():
        logps = recipe.policy_logps(model, batch)
    for pair, (c, r) in zip([pairs[i] for i in batch["order"]], logps.reshape(-1, 2).tolist()):
        pair.reference = (c - 1.0, r + 1.0)  # the policy already prefers chosen by 2 nats
    loss, metrics = recipe.loss_fn(model, collate_pairs([pairs[0], None, pairs[1], pairs[2]], 0), cfg)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert metrics["loss"] == pytest.approx(float(metrics["preference_loss"] + 0.5 * metrics["sft_loss"]), rel=1e-5)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    if loss_type not in ("simpo", "orpo"):
        assert metrics["rewards/margin"] == pytest.approx(3 * 0.1 * 2.0, rel=1e-3)
        assert metrics["rewards/accuracy"] == 3
    empty_loss, empty = recipe.loss_fn(model, collate_pairs([None, None], 0), cfg)
    assert float(empty_loss.detach()) == 0 and all(float(v) == 0 for v in empty.values())


def test_kto_on_unpaired_data(tmp_path):
    """At step 1 policy == reference: rho = 0 and z_0 = 0, so every example's loss is
    1 - sigma(0) = 0.5 exactly; then desirable completions gain implicit reward over undesirable ones."""
    out = tmp_path / "kto"
    dpo(
        out,
        "loss.type=kto",
        "optim.lr=5e-4",
        "data.train.path=builtin:kto?n=256&seed=0",
        "data.validation.path=builtin:kto?n=64&seed=1&split=valid",
        "checkpoint.every=null",
    )
    train = train_rows(out)
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-6) and train[0]["kl"] == 0
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "kl"} <= train[0].keys()
    assert not any(k.startswith("count/") for k in train[0])
    assert statistics.mean(r["loss"] for r in train[-10:]) < statistics.mean(r["loss"] for r in train[:10]) - 0.02
    assert statistics.mean(r["rewards/margin"] for r in train[-10:] if "rewards/margin" in r) > 0.2
    AutoModelForCausalLM.from_pretrained(out / "final")


# --- iterative on-policy DPO (`online`): sample, judge, pair, train; repeat from the result ------


def online_dpo(out, *overrides, env=None):
    return run_cli(
        "run", "dpo", "--config", "tiny_online", f"output_dir={out}", *QUIET, *overrides, env={**ENV, **(env or {})}
    )


def read_pairs(out, t):
    return [json.loads(line) for line in (out / f"iteration_{t}" / "pairs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_online") / "run"
    result = online_dpo(out)
    assert result.returncode == 0, result.stderr
    return out


def test_online_dpo_trains_each_iteration_from_and_against_the_last_result(online_run):
    out = online_run
    rollout = metrics(out)  # one row of pair statistics per iteration
    assert [r["step"] for r in rollout] == [1, 2]
    for t, row in zip((1, 2), rollout):
        pairs = read_pairs(out, t)
        assert row["rollout/pairs"] == len(pairs) > 0 and 0 < row["rollout/ended_fraction"] < 1
        assert all(p["chosen_reward"] - p["rejected_reward"] >= 0.05 for p in pairs)  # ties skipped
        assert len({p["prompt"] for p in pairs}) == len(pairs)  # best vs worst: one pair per prompt
        train = train_rows(out / f"iteration_{t}")
        assert [r["step"] for r in train] == list(range(1, 7))
        # The reference is the iteration's starting policy: every implicit reward is 0 at step 1.
        assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert train[-1]["rewards/margin"] > train[0]["rewards/margin"] + 1.0
    assert read_pairs(out, 1) != read_pairs(out, 2)  # sampled afresh, from the new policy
    # Iteration 2 starts from iteration 1's result, which is also its reference.
    cache = next((out / "iteration_2" / "reference_logps").glob("train-*.safetensors"))
    with safe_open(str(cache), "pt") as f:
        assert json.loads(f.metadata()["reference"])["path"] == str((out / "iteration_1" / "final").resolve())
    final, last = (
        load_file(str(out / "final" / "model.safetensors")),
        load_file(str(out / "iteration_2" / "final" / "model.safetensors")),
    )
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def test_online_dpo_resumed_equals_uninterrupted(online_run, tmp_path):
    out, resumed = online_run, tmp_path / "resumed"
    killed = online_dpo(resumed, env={"ALIGNKIT_TEST_KILL_AT_STEP": "4"})  # in iteration 1, after its pairs
    assert killed.returncode != 0 and not (resumed / "iteration_2").exists()
    result = online_dpo(resumed)
    assert result.returncode == 0, result.stderr
    assert "iteration 1: reusing the pairs" in result.stderr and "step 4 of 6" in result.stderr
    assert metrics(resumed) == metrics(out)
    keys = ["loss", "rewards/margin"]
    for t in (1, 2):
        assert read_pairs(resumed, t) == read_pairs(out, t)
        assert [r[k] for r in train_rows(resumed / f"iteration_{t}") for k in keys] == pytest.approx(
            [r[k] for r in train_rows(out / f"iteration_{t}") for k in keys], rel=1e-6, abs=1e-7
        )
