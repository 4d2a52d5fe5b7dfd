"""The rl_variants and onpolicy_distill stages' wiring: every method is an option set of the one
reinforce recipe that loads with the demo's GRPO config, and the report renders their results."""

from __future__ import annotations

from alignkit.config import find_config, load_config
from alignkit.demo.rl_variants import METHODS, report_lines
from alignkit.recipes import recipe_module


def test_every_method_is_a_valid_reinforce_config():
    config = recipe_module("reinforce").Config
    for name, overrides in METHODS.items():
        cfg = load_config(config, find_config("demo", "grpo"), [*overrides, "reinforce.max_generated_tokens=1000"])
        assert cfg.reinforce.max_generated_tokens == 1000, name
    assert set(METHODS) == {"grpo", "dapo", "gspo", "cispo", "reinforce_pp_baseline"}
    assert load_config(config, find_config("demo", "onpolicy_distill")).reinforce.estimator == "onpolicy_distill"


def test_the_report_renders_both_stages():
    method = {
        "correctness": 0.25,
        "correctness_ci_low": 0.23,
        "correctness_ci_high": 0.27,
        "correctness_gain_vs_sft": 0.01,
        "correctness_gain_vs_sft_ci_low": 0.0,
        "correctness_gain_vs_sft_ci_high": 0.02,
        "kl": 0.5,
        "zero_variance_group_share": 0.8,
        "tokens_per_useful_group": 900.0,
        "steps": 60,
    }
    student = {
        "reward": 0.54,
        "reward_ci_low": 0.53,
        "reward_ci_high": 0.55,
        "kl": 1.0,
        "kl_ci_low": 0.8,
        "kl_ci_high": 1.2,
    }
    results = {
        "rl_variants": {"grpo": method, "dapo": {**method, "steps": 30}, "seconds": 10.0},
        "onpolicy_distill": {
            "offline": student,
            "onpolicy": student,
            "reward_gain_onpolicy_vs_offline": 0.0,
            "reward_gain_onpolicy_vs_offline_ci_low": -0.01,
            "reward_gain_onpolicy_vs_offline_ci_high": 0.01,
        },
    }
    text = "\n".join(report_lines(results))
    assert "| dapo | 0.250 [0.230, 0.270] | +0.010 [+0.000, +0.020] | 0.50 | 0.80 | 900 | 30 |" in text
    assert "- onpolicy: oracle reward 0.540 [0.530, 0.550], KL to the teacher 1.00 [0.80, 1.20]" in text
