"""The demo's pipeline with stages passed in (the real stages are slow): dependencies,
fingerprint-based reuse, the summary and the report; and the shipped stage table and settings."""

import json

import pytest

from alignkit.config import configs_dir, find_config, load_config
from alignkit.demo import DEFAULT_STAGES, STAGES, DemoConfig, Stage, run_pipeline
from alignkit.tasks import ATTRIBUTES
from alignkit.training.logging import get_logger

SETTINGS = load_config(DemoConfig, configs_dir() / "demo.yaml")
get_logger()  # its handler writes to the session's stderr, not to one test's capsys stream (closed after it)


def model_metrics(reward):
    return {
        "reward": reward,
        "reward_ci_low": reward - 0.1,
        "reward_ci_high": reward + 0.1,
        "correctness": 0.5,
        "harmful_rate": 0.1,
        **{f"attribute/{a}": 2.0 for a in ATTRIBUTES},
    }


def fake_stages(calls, m2_settings=()):
    """data (writes the held-out prompts) -> m1 -> m2, the models' results made up."""

    def data(demo):
        calls.append("data")
        demo.path("data").mkdir(parents=True)
        demo.path("data", "eval_prompts.jsonl").write_text('{"prompt": "x"}\n' * 4)
        return {}

    def model(name, reward):
        def run(demo):
            calls.append(name)
            demo.path(name).mkdir(parents=True)
            demo.path(name, "eval.json").write_text(json.dumps({"rewards": [reward] * 4}))
            return model_metrics(reward)

        return run

    return [
        Stage("data", data, ()),
        Stage("m1", model("m1", 0.4), ("data",), is_model=True),
        Stage("m2", model("m2", 0.6), ("m1",), settings=m2_settings, is_model=True),
    ]


def run(stages, names, root, version=1, settings=SETTINGS, default=("m1",)):
    return run_pipeline(stages, names, root, settings, version, default)


def test_dependencies_run_first_and_results_are_reused(tmp_path, capsys):
    calls = []
    stages = fake_stages(calls)
    summary = run(stages, ["m2"], tmp_path)
    assert calls == ["data", "m1", "m2"]
    assert summary["m2"]["reward"] == 0.6
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved) == {"m1", "m2"} and saved["m2"]["reward"] == 0.6
    report = (tmp_path / "report.md").read_text()
    assert report.count("| m") == 2 and (tmp_path / "reward.png").is_file()
    assert "Held-out prompts: 4 " in report and "temperature 0.7" in report  # from the settings
    assert "| m2 | 0.600 [0.500, 0.700]" in capsys.readouterr().out
    run(stages, ["m2"], tmp_path)
    assert calls == ["data", "m1", "m2"]  # nothing recomputed


def test_a_new_code_version_invalidates_every_stage(tmp_path):
    calls = []
    stages = fake_stages(calls)
    run(stages, ["m2"], tmp_path)
    run(stages, ["m1"], tmp_path, version=2)
    assert calls == ["data", "m1", "m2", "data", "m1"]


def test_unknown_stage_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown demo stage\(s\) \['dpoo'\]"):
        run(fake_stages([]), ["dpoo"], tmp_path)


def test_a_changed_settings_section_invalidates_the_stages_that_read_it(tmp_path):
    calls = []
    stages = fake_stages(calls, m2_settings=("steering",))
    run(stages, ["m2"], tmp_path)
    other_section = SETTINGS.model_copy(update={"draftp": SETTINGS.draftp.model_copy(update={"grid_prompts": 2})})
    run(stages, ["m2"], tmp_path, settings=other_section)
    assert calls == ["data", "m1", "m2"]  # m2 does not read draftp
    steering = SETTINGS.model_copy(update={"steering": SETTINGS.steering.model_copy(update={"eval_prompts": 7})})
    run(stages, ["m2"], tmp_path, settings=steering)
    assert calls == ["data", "m1", "m2", "m2"]


def test_reporting_stages_enter_the_summary(tmp_path):
    calls = []
    report = Stage("rm", lambda demo: {"pairwise_accuracy": 0.9}, ("data",), in_summary=True)
    run([*fake_stages(calls), report], ["m1", "rm"], tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved) == {"m1", "rm"} and saved["rm"] == {"pairwise_accuracy": 0.9, "seconds": saved["rm"]["seconds"]}


def test_no_stage_names_run_the_default_stages_and_all_runs_every_stage(tmp_path):
    calls = []
    stages = fake_stages(calls)
    run(stages, None, tmp_path, default=["m1"])
    assert calls == ["data", "m1"]  # `make demo`: the default stages and what they need, not the whole tour
    run(stages, ["all"], tmp_path)
    assert calls == ["data", "m1", "m2"]


def test_current_results_of_stages_not_requested_stay_in_the_report(tmp_path):
    calls = []
    stages = fake_stages(calls)
    run(stages, ["m2"], tmp_path)
    run(stages, ["m1"], tmp_path)  # m2 is current: reported, not rerun
    assert calls == ["data", "m1", "m2"]
    assert set(json.loads((tmp_path / "summary.json").read_text())) == {"m1", "m2"}
    run(stages, ["m1"], tmp_path, version=2)  # m2's results are stale now: left out
    assert set(json.loads((tmp_path / "summary.json").read_text())) == {"m1"}


def test_the_rl_section_is_rendered_once_for_the_file_and_the_console(tmp_path, capsys):
    curves = {"step": [1, 2], "reward": [0.1, 0.2], "oracle": [0.3, 0.4], "kl": [0.0, 0.1]}

    def grpo(demo):
        demo.path("grpo").mkdir(parents=True)
        demo.path("grpo", "eval.json").write_text(json.dumps({"rewards": [0.5] * 4}))
        return {**model_metrics(0.5), "curves": curves}

    run([*fake_stages([]), Stage("grpo", grpo, ("m1",), is_model=True)], ["grpo"], tmp_path)
    line = "RL training curves (rollout reward the stage trains on"
    assert (tmp_path / "report.md").read_text().count(line) == 1 and capsys.readouterr().out.count(line) == 1
    assert (tmp_path / "rl_curves.png").is_file()


def test_the_shipped_stage_table_names_real_configs_settings_and_earlier_stages():
    names = [s.name for s in STAGES]
    assert set(DEFAULT_STAGES) <= set(names)
    for i, stage in enumerate(STAGES):
        assert set(stage.needs) <= set(names[:i]), stage.name  # the table is in dependency order
        assert set(stage.settings) <= set(DemoConfig.model_fields), stage.name
        assert all(find_config("demo", c).is_file() for c in stage.configs), stage.name
        assert not stage.is_model or "evaluation" in stage.settings, stage.name  # evaluated: fingerprinted


def test_the_settings_file_is_checked_and_names_a_bad_key(tmp_path):
    assert SETTINGS.steering.best_targets == {
        "helpfulness": 4,
        "correctness": 4,
        "coherence": 4,
        "harmlessness": 4,
        "verbosity": 1,
        "politeness": 4,
    }
    bad = tmp_path / "demo.yaml"
    bad.write_text((configs_dir() / "demo.yaml").read_text().replace("eval_per_skill:", "eval_per_skil:"))
    with pytest.raises(ValueError, match="eval_per_skil"):
        load_config(DemoConfig, bad)
