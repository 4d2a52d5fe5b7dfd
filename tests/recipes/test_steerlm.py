"""SteerLM and SteerLM 2.0 end to end through the real CLI on tiny random Llamas (oracle labels)."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file
from transformers import AutoConfig

from alignkit.data.io import read_records
from alignkit.tasks import score_response
from tests.conftest import run_cli

QUIET = ["logging.progress=none"]
ENV = {"OMP_NUM_THREADS": "1"}


def cli(*args, ok=True, env=None):
    result = run_cli(*args, env={**ENV, **(env or {})})
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def steerlm_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("steerlm") / "run"
    cli("run", "steerlm", "--config", "tiny", f"output_dir={out}", *QUIET)
    return out


def steerlm2(out, model, *overrides, ok=True, env=None):
    return cli(
        "run",
        "steerlm2",
        "--config",
        "tiny",
        f"output_dir={out}",
        f"model.path={model}",
        f"steerlm2.prior_path={model}",
        *QUIET,
        *overrides,
        ok=ok,
        env=env,
    )


# --- SteerLM -------------------------------------------------------------------------------------


def test_steerlm_trains_on_labelled_responses_and_records_its_format(steerlm_model):
    metrics = [m for m in lines(steerlm_model / "metrics.jsonl") if "loss" in m]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    config = AutoConfig.from_pretrained(steerlm_model / "final")
    assert config.steerlm["attributes"] == ["verbosity", "politeness"]
    assert config.steerlm["label_template"] == "[{label}]\n"
    assert set(config.steerlm["defaults"]) == {"verbosity", "politeness"}


def test_generate_is_steered_by_requested_attributes(steerlm_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "What is 2 + 2?"})
        + "\n"
        + json.dumps({"prompt": "What is 3 + 3?", "attributes": {"verbosity": 4}})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    cli(
        "generate",
        "--model",
        str(steerlm_model / "final"),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--attributes",
        "politeness:0",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    )
    rows = lines(out)
    defaults = AutoConfig.from_pretrained(steerlm_model / "final").steerlm["defaults"]
    assert rows[0]["label"] == f"verbosity:{defaults['verbosity']},politeness:0"  # the rest: defaults
    assert rows[1]["label"] == f"verbosity:4,politeness:{defaults['politeness']}"  # the record's own wins
    bad = cli(
        "generate",
        "--model",
        str(steerlm_model / "final"),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--attributes",
        "verbosty:1",
        ok=False,
    )
    assert bad.returncode == 2 and "did you mean 'verbosity'" in bad.stderr


def test_annotate_cli_and_recipe_label_with_the_oracle(tmp_path):
    out = tmp_path / "labelled.jsonl"
    cli(
        "annotate", "--data", "builtin:demos?n=6", "--out", str(out), "--oracle", "--attributes", "verbosity,politeness"
    )
    for row, record in zip(lines(out), read_records("builtin:demos?n=6")):
        s = score_response(record.data["prompt"], record.data["response"])
        assert row["label"] == f"verbosity:{s.verbosity},politeness:{s.politeness}"
    run = tmp_path / "run"
    cli(
        "run",
        "steerlm",
        "--config",
        "tiny",
        f"output_dir={run}",
        "data.train.path=builtin:demos?n=64",
        "data.validation=null",
        "annotate.kind=oracle",
        "train.max_steps=2",
        *QUIET,
    )
    assert [r["label"] for r in lines(run / "annotated.jsonl")][:6] == [r["label"] for r in lines(out)]
    missing = cli(
        "annotate", "--data", "builtin:demos?n=2", "--out", str(out), "--oracle", "--attributes", "humour", ok=False
    )
    assert missing.returncode == 2 and "the label needs ['humour']" in missing.stderr


def test_unlabelled_data_without_an_annotator_is_an_error(tmp_path):
    result = cli(
        "run",
        "steerlm",
        "--config",
        "tiny",
        f"output_dir={tmp_path}",
        "data.train.path=builtin:demos?n=4",
        *QUIET,
        ok=False,
    )
    assert result.returncode == 2 and "builtin:demos?n=4#0: a SteerLM record needs a 'label'" in result.stderr


# --- SteerLM 2.0 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def steerlm2_run(steerlm_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("steerlm2") / "run"
    steerlm2(out, steerlm_model / "final")
    return out


def test_samples_carry_three_log_probabilities_and_q_matches_the_sampler(steerlm2_run):
    groups = lines(steerlm2_run / "iteration_1/samples.jsonl")
    assert len(groups) == 16 and all(len(g["responses"]) == 4 for g in groups)
    for g in groups:
        assert g["label"].startswith("verbosity:")
        for r in g["responses"]:
            assert r["log(P(a|x,y))"] <= 0 and r["log(P(y|x))"] <= 0
            # log Q'(y|a,x) from the training forward == the engine's own log-probs at temperature 1
            assert abs(r["log(Q(y|a,x))"] - r["sampler_logprob"]) < 1e-3
            # in this smoke config the prior is the same model, on the unlabelled prompt
            assert r["log(P(y|x))"] != pytest.approx(r["log(Q(y|a,x))"], abs=1e-6)
    rollout = lines(steerlm2_run / "metrics.jsonl")
    assert [r["step"] for r in rollout] == [1, 2] and all(0 < r["rollout/weights_ess"] <= 1 for r in rollout)
    assert all("distance" in m for m in lines(steerlm2_run / "iteration_2/metrics.jsonl"))


def test_first_step_distance_is_kl_from_uniform(steerlm_model, tmp_path):
    """At step 0 the policy is Q', so b' is uniform and distance = sum w' log(n w'); with the whole
    data in one step, the logged value is its mean over the 16 groups."""
    out = tmp_path / "one"
    steerlm2(
        out, steerlm_model / "final", "steerlm2.iterations=1", "train.global_batch_size=16", "train.micro_batch_size=8"
    )
    expected = []
    for g in lines(out / "iteration_1/samples.jsonl"):
        logits = [r["log(P(a|x,y))"] + r["log(P(y|x))"] - r["log(Q(y|a,x))"] for r in g["responses"]]
        top = max(logits)
        w = [math.exp(v - top) for v in logits]
        w = [v / sum(w) for v in w]
        expected.append(sum(v * math.log(v * len(w)) for v in w if v > 0))
    first = lines(out / "iteration_1/metrics.jsonl")[0]
    assert first["distance"] == pytest.approx(sum(expected) / len(expected), abs=2e-3)


def test_steerlm2_resumes_after_a_kill(steerlm_model, steerlm2_run, tmp_path):
    out = tmp_path / "resumed"
    first = steerlm2(out, steerlm_model / "final", ok=False, env={"ALIGNKIT_TEST_KILL_AT_STEP": "3"})
    assert first.returncode != 0 and (out / "iteration_1/samples.jsonl").is_file()
    second = steerlm2(out, steerlm_model / "final")
    assert "reusing 16 sampled groups" in second.stderr
    assert lines(out / "metrics.jsonl") == lines(steerlm2_run / "metrics.jsonl")
    a = load_file(str(steerlm2_run / "final/model.safetensors"))
    b = load_file(str(out / "final/model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_steerlm2_needs_a_steerlm_model(tmp_path):
    cli("run", "sft", "--config", "tiny", f"output_dir={tmp_path / 'sft'}", "train.max_steps=1", *QUIET)
    result = steerlm2(tmp_path / "x", tmp_path / "sft/final", ok=False)
    assert result.returncode == 2 and "is not a SteerLM model" in result.stderr


def test_steerlm2_needs_two_samples_per_target(tmp_path):
    result = steerlm2(tmp_path / "x", tmp_path / "unused", "sampling.n=1", ok=False)  # refused before loading
    assert result.returncode == 2 and "sampling.n=1: SteerLM 2.0's weights are a softmax" in result.stderr


@pytest.mark.distributed
def test_steerlm2_two_processes_share_the_prompts(steerlm_model, steerlm2_run, tmp_path):
    out = tmp_path / "two"
    result = steerlm2(
        out, steerlm_model / "final", "--nproc", "2", "distributed.strategy=ddp", "train.micro_batch_size=1"
    )
    assert "2 processes" in result.stderr
    one = lines(steerlm2_run / "iteration_1/samples.jsonl")
    two = lines(out / "iteration_1/samples.jsonl")
    assert sorted(g["prompt"] for g in two) == sorted(g["prompt"] for g in one)
    assert (out / "final/config.json").is_file()
    # tensor parallel: each process samples its own prompts with the whole model, as above, then the
    # policy trains split over both: the samples and every loss of the data-parallel run
    split = tmp_path / "tp"
    steerlm2(split, steerlm_model / "final", "--nproc", "2", "distributed.mesh.tp=2", "train.micro_batch_size=1")
    assert lines(split / "iteration_1/samples.jsonl") == two
    for it in ("iteration_1", "iteration_2"):
        dp, tp = (
            [{k: v for k, v in r.items() if not k.startswith(("timing/", "throughput/", "perf/"))} for r in rows]
            for rows in (lines(out / it / "metrics.jsonl"), lines(split / it / "metrics.jsonl"))
        )
        assert len(dp) == len(tp) > 0
        assert all(b == pytest.approx(a, rel=1e-4, abs=1e-6) for a, b in zip(dp, tp))
