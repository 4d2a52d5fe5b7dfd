"""Reward sources: python functions, the oracle, configuration errors (the HTTP client is tested
against a real server in tests/unit/serving/test_reward_server.py)."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import ConfigError, validate
from alignkit.rewards import FunctionReward, OracleReward, RewardSourceConfig, RewardSourceError, build_reward_source


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
        ("alignkit.nope:f", "No module named 'alignkit.nope'"),
        (f"{__name__}:missing", "has no attribute 'missing'"),
    ],
)
def test_bad_function_specs_are_named(spec, message):
    with pytest.raises(RewardSourceError, match=message):
        FunctionReward(spec)


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
