"""Reward sources: python functions, the oracle, configuration errors (the HTTP client is tested
against a real server in tests/unit/serving/test_reward_server.py)."""

from __future__ import annotations

import socket
import sys

import pytest
import torch

from alignkit.config import ConfigError, validate
from alignkit.rewards import FunctionReward, OracleReward, RewardSourceConfig, RewardSourceError, build_reward_source
from tests.conftest import REPO, run_cli


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def attribute_reward(prompts, responses):
    return {"rewards": [1.0] * len(responses), "attributes": [[len(r), 0] for r in responses], "names": ["len", "zero"]}


def wrong_count(prompts, responses):
    return [1.0]


def test_function_source_returns_rewards_and_optional_attributes():
    out = FunctionReward(f"{__name__}:length_reward")(["a", "b"], ["xy", "xyz"])
    assert out.rewards.tolist() == [2.0, 3.0] and out.attributes is None
    out = FunctionReward(f"{__name__}:attribute_reward")(["a"], ["xyz"])
    assert out.attributes.tolist() == [[3.0, 0.0]] and out.names == ["len", "zero"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "expected 'package.module:function'"),
        ("alignkit.nope:f", "no module named 'alignkit.nope' \\(looked in the installed packages and the working"),
        (f"{__name__}:missing", "has no function 'missing'"),
        (f"{__name__}:PROMPTS_NOT_A_FUNCTION", "has no function 'PROMPTS_NOT_A_FUNCTION'"),
    ],
)
def test_bad_function_specs_are_named(spec, message):
    with pytest.raises(RewardSourceError, match=message):
        FunctionReward(spec)


PROMPTS_NOT_A_FUNCTION = ["a"]


def test_a_module_in_the_working_directory_is_found_as_python_m_would(tmp_path, monkeypatch):
    (tmp_path / "my_reward_here.py").write_text("def fn(prompts, responses):\n    return [1.0] * len(responses)\n")
    (tmp_path / "broken_reward_here.py").write_text("def fn(:\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert FunctionReward("my_reward_here:fn")(["a"], ["b"]).rewards.tolist() == [1.0]
    with pytest.raises(RewardSourceError, match=r"importing broken_reward_here failed: SyntaxError: .*line 1\)"):
        FunctionReward("broken_reward_here:fn")


@pytest.mark.parametrize("kind", ["function", "http"])
def test_a_reward_source_that_cannot_work_ends_run_in_one_line(tmp_path, kind):
    (tmp_path / "broken_reward_here.py").write_text("import no_such_package_here\n")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    source = {
        "function": ["reward.kind=function", "reward.function=broken_reward_here:fn"],
        "http": ["reward.kind=http", f"reward.url={dead}", "reward.retries=0"],
    }[kind]
    overrides = [f"output_dir={tmp_path / 'run'}", "logging.progress=none", *source]
    result = run_cli(
        "run", "reinforce", "--config", str(REPO / "configs/reinforce/tiny.yaml"), *overrides, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    expected = {
        "function": "error: reward function 'broken_reward_here:fn': importing broken_reward_here failed: "
        "ModuleNotFoundError: No module named 'no_such_package_here'",
        "http": f"error: reward server {dead} unreachable after 1 attempts (ConnectError",
    }[kind]
    assert result.stderr.strip().splitlines()[-1].startswith(expected) and "Traceback" not in result.stderr


def test_a_function_returning_the_wrong_count_is_reported():
    with pytest.raises(RewardSourceError, match=r"wrong_count: returned 1 rewards for 2 responses"):
        FunctionReward(f"{__name__}:wrong_count")(["a", "b"], ["x", "y"])


def test_oracle_source_prefers_the_right_answer():
    from alignkit.tasks import generate_prompts

    prompt = generate_prompts(1, seed=0, skills=("arith",))[0]
    out = OracleReward()([prompt, prompt["prompt"]], [f"The answer is {prompt['answer']}.", "The answer is banana."])
    assert out.rewards[0] > out.rewards[1] and out.attributes.shape == (2, 7) and "correctness" in out.names


def test_config_needs_the_kinds_field():
    with pytest.raises(ConfigError, match=r"kind=http needs `url`"):
        validate(RewardSourceConfig, {"kind": "http"})
    with pytest.raises(ConfigError, match=r"unknown config key 'urll'; did you mean 'url'"):
        validate(RewardSourceConfig, {"kind": "http", "urll": "x"})
    source = build_reward_source(RewardSourceConfig(kind="function", function=f"{__name__}:length_reward"))
    assert torch.equal(source(["p"], ["abc"]).rewards, torch.tensor([3.0]))


def test_scored_records_are_checked_before_any_model_runs():
    from alignkit.data.io import DataError, Record
    from alignkit.rewards.scoring import _sides

    good = Record({"prompt": "q", "response": "a"}, "s.jsonl:1")
    assert _sides([good]) == ["response"]
    for data, message in [
        ({"prompt": {"x": 1}, "response": "a"}, "s.jsonl:2: field 'prompt'"),
        ({"prompt": "q", "response": ["a"]}, "s.jsonl:2: field 'response' must be text, got list"),
        ({"prompt": [{"role": "bot", "content": "q"}], "response": "a"}, "s.jsonl:2: field 'prompt': message 0"),
    ]:
        with pytest.raises(DataError, match=message):
            _sides([good, Record(data, "s.jsonl:2")])
