"""The demo's orchestration: dependencies, fingerprint-based reuse (stages themselves are slow)."""

import json

import pytest

from alignkit import demo as demo_module


def fake_stages(calls):
    def make(name, is_model=False):
        def run(demo):
            calls.append(name)
            if is_model:
                (demo.path(name)).mkdir(parents=True, exist_ok=True)
                reward = {"m1": 0.4, "m2": 0.6}[name]
                rewards = [reward] * 4
                (demo.path(name, "eval.json")).write_text(json.dumps({"rewards": rewards}))
                return {"reward": reward, "reward_ci_low": reward - 0.1, "reward_ci_high": reward + 0.1,
                        "correctness": 0.5, "harmful_rate": 0.1,
                        **{f"attribute/{a}": 2.0 for a in demo_module_attributes()}}
            return {}
        return run

    return [
        demo_module.Stage("a", make("a"), ()),
        demo_module.Stage("m1", make("m1", True), ("a",), is_model=True),
        demo_module.Stage("m2", make("m2", True), ("m1",), is_model=True),
    ]


def demo_module_attributes():
    from alignkit.tasks import ATTRIBUTES

    return ATTRIBUTES


@pytest.fixture
def stages(monkeypatch):
    calls = []
    monkeypatch.setattr(demo_module, "STAGES", fake_stages(calls))
    monkeypatch.setattr(demo_module.Demo, "eval_prompts", lambda self: [{}] * 4)
    return calls


def test_dependencies_run_first_and_results_are_reused(tmp_path, stages):
    summary = demo_module.run_demo(["m2"], tmp_path)
    assert stages == ["a", "m1", "m2"]
    assert summary["m2"]["reward"] == 0.6
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved) == {"m1", "m2"} and saved["m2"]["reward"] == 0.6
    assert (tmp_path / "report.md").read_text().count("| m") == 2 and (tmp_path / "reward.png").is_file()
    demo_module.run_demo(["m2"], tmp_path)
    assert stages == ["a", "m1", "m2"]  # nothing recomputed


def test_changed_upstream_invalidates_downstream(tmp_path, stages, monkeypatch):
    demo_module.run_demo(["m2"], tmp_path)
    monkeypatch.setattr(demo_module, "DEMO_VERSION", demo_module.DEMO_VERSION + 1)
    demo_module.run_demo(["m1"], tmp_path)
    assert stages == ["a", "m1", "m2", "a", "m1"]


def test_unknown_stage_is_named(tmp_path, stages):
    with pytest.raises(ValueError, match=r"unknown demo stage\(s\) \['dpoo'\]"):
        demo_module.run_demo(["dpoo"], tmp_path)


def test_changed_stage_settings_invalidate_the_stage(tmp_path, stages, monkeypatch):
    demo_module.run_demo(["m2"], tmp_path)
    changed = [demo_module.Stage(st.name, st.run, st.needs, is_model=st.is_model, settings=(1,) if st.name == "m2" else ())
               for st in demo_module.STAGES]
    monkeypatch.setattr(demo_module, "STAGES", changed)
    demo_module.run_demo(["m2"], tmp_path)
    assert stages == ["a", "m1", "m2", "m2"]


def test_reporting_stages_enter_the_summary(tmp_path, stages, monkeypatch):
    report = demo_module.Stage("rm", lambda demo: {"pairwise_accuracy": 0.9}, ("a",), in_summary=True)
    monkeypatch.setattr(demo_module, "STAGES", [*demo_module.STAGES, report])
    demo_module.run_demo(["m1", "rm"], tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved) == {"m1", "rm"} and saved["rm"] == {"pairwise_accuracy": 0.9, "seconds": saved["rm"]["seconds"]}


def test_no_stage_names_run_the_default_stages_and_all_runs_every_stage(tmp_path, stages, monkeypatch):
    monkeypatch.setattr(demo_module, "DEFAULT_STAGES", ["m1"])
    demo_module.run_demo(None, tmp_path)
    assert stages == ["a", "m1"]  # `make demo`: the default stages and what they need, not the whole tour
    demo_module.run_demo(["all"], tmp_path)
    assert stages == ["a", "m1", "m2"]


def test_current_results_of_stages_not_requested_stay_in_the_report(tmp_path, stages, monkeypatch):
    demo_module.run_demo(["m2"], tmp_path)
    demo_module.run_demo(["m1"], tmp_path)  # m2 is current: reported, not rerun
    assert stages == ["a", "m1", "m2"]
    assert set(json.loads((tmp_path / "summary.json").read_text())) == {"m1", "m2"}
    monkeypatch.setattr(demo_module, "DEMO_VERSION", demo_module.DEMO_VERSION + 1)
    demo_module.run_demo(["m1"], tmp_path)  # m2's results are stale now: left out
    assert set(json.loads((tmp_path / "summary.json").read_text())) == {"m1"}
