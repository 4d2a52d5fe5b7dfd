"""On-policy preference pairs (alignkit.training.sampled_pairs) from a tiny random model and a
judge that records what it was asked."""

from __future__ import annotations

import pytest

from alignkit.config import SamplingConfig
from alignkit.data.io import read_records
from alignkit.training.sampled_pairs import sampled_preference_pairs
from tests.conftest import tiny_model

SAMPLING = SamplingConfig(n=4, max_new_tokens=20, temperature=1.0, seed=3, batch_size=4)


@pytest.fixture(scope="module")
def prompts():
    return read_records("builtin:prompts?n=10&seed=0")


class LengthJudge:
    """Reward = answer length / 100, rounded (so ties happen); remembers every answer it saw."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, prompts, responses):
        assert all(isinstance(p, dict) and "prompt" in p for p in prompts)
        self.seen += responses
        return [round(len(r) / 100, 2) for r in responses]


def test_best_against_worst_of_each_prompt_unended_answers_score_zero(tokenizer, prompts):
    model = tiny_model(tokenizer)
    judge = LengthJudge()
    pairs, metrics = sampled_preference_pairs(model, tokenizer, prompts, SAMPLING, judge, min_margin=0.05)
    assert pairs and metrics["rollout/pairs"] == len(pairs)
    order = [r.data["prompt"] for r in prompts]
    assert [order.index(p["prompt"]) for p in pairs] == sorted(order.index(p["prompt"]) for p in pairs)
    for p in pairs:
        assert p["chosen_reward"] - p["rejected_reward"] >= 0.05 and p["margin"] == round(
            p["chosen_reward"] - p["rejected_reward"], 4
        )
        # a rejected answer the judge never saw was cut by max_new_tokens: it scores 0
        assert p["rejected"] in judge.seen or p["rejected_reward"] == 0.0
    assert 0 < metrics["rollout/ended_fraction"] < 1 and len(judge.seen) == round(
        metrics["rollout/ended_fraction"] * len(prompts) * SAMPLING.n
    )


def test_samples_are_seeded_ties_are_skipped_and_all_pairs_extends_best_vs_worst(tokenizer, prompts):
    model = tiny_model(tokenizer)
    best, _ = sampled_preference_pairs(model, tokenizer, prompts, SAMPLING, LengthJudge())
    again, _ = sampled_preference_pairs(model, tokenizer, prompts, SAMPLING, LengthJudge())
    assert again == best  # per-batch seeds: the same answers
    reseeded, _ = sampled_preference_pairs(
        model, tokenizer, prompts, SAMPLING.model_copy(update={"seed": 4}), LengthJudge()
    )
    assert reseeded != best
    every, _ = sampled_preference_pairs(model, tokenizer, prompts, SAMPLING, LengthJudge(), all_pairs=True)
    assert len(every) > len(best) and all(p in every for p in best)
    tied, metrics = sampled_preference_pairs(
        model, tokenizer, prompts, SAMPLING, lambda ps, rs: [1.0] * len(rs), min_margin=1.5
    )  # unended (0) vs ended (1): within the margin
    assert tied == [] and metrics["rollout/pairs"] == 0
    with pytest.raises(ValueError, match="at least 2 answers"):
        sampled_preference_pairs(model, tokenizer, prompts, SAMPLING.model_copy(update={"n": 1}), LengthJudge())
