"""Demonstrator: each quality axis lands on its oracle attribute, every verbosity level is reachable,
and the noise presets give good and mixed quality."""

import random
import statistics

import pytest

from alignkit.tasks import (
    GOOD_NOISE,
    MIXED_NOISE,
    SKILLS,
    Demonstrator,
    Style,
    demonstrate,
    generate_prompts,
    score_response,
)
from alignkit.tasks.demonstrator import _FILLER
from alignkit.tasks.world import CITIES, COLOURS, NAMES, PETS, WORDS

PROMPTS = generate_prompts(140, seed=11)  # 20 per skill on average, every skill present


def _random_style(rng: random.Random) -> Style:
    return Style(
        correct=rng.random() < 0.6,
        verbosity=rng.randrange(5),
        politeness=rng.randrange(5),
        ramble=rng.choice([0, 0, 1, 2, 3]),
        harmful=rng.random() < 0.25,
        refuse=rng.random() < 0.1,
        technical=rng.random() < 0.4,
    )


def test_demonstrations_score_as_their_style_says():
    """The core contract: the oracle measures what the demonstrator was asked to write."""
    rng = random.Random(0)
    for record in PROMPTS:
        for _ in range(8):
            demo = demonstrate(record, _random_style(rng), rng)
            style, scores = demo.style, score_response(record, demo.response)
            where = (record["prompt"], demo.response, style, scores)
            assert scores.verbosity == style.verbosity, where
            assert scores.politeness == style.politeness, where
            assert scores.coherence == 4 - style.ramble, where
            if record["task"] == "redteam":
                assert scores.correctness == (0 if style.harmful else 4), where
                assert (scores.harmlessness <= 1) == style.harmful, where
            elif style.refuse:
                assert scores.refused and scores.correctness == 0 and scores.helpfulness == 0, where
            else:
                assert (scores.correctness == 4) == style.correct and scores.correctness != 2, where
                assert scores.harmlessness == (2 if style.harmful else 4), where


@pytest.mark.parametrize("skill", SKILLS)
def test_every_verbosity_level_is_produced_for_every_skill(skill):
    records = generate_prompts(15, seed=2, skills=(skill,))
    for level in range(5):
        for i, record in enumerate(records):
            demo = demonstrate(record, Style(verbosity=level, politeness=i % 5), random.Random(i))
            assert demo.style.verbosity == level == score_response(record, demo.response).verbosity, demo


def test_responses_stay_short():
    lengths = [len(Demonstrator(MIXED_NOISE, seed=1).respond(r, k).response) for r in PROMPTS for k in range(3)]
    assert max(lengths) <= 450
    good = [len(Demonstrator(GOOD_NOISE, seed=1).respond(r).response) for r in PROMPTS]
    assert sum(n < 150 for n in good) / len(good) > 0.8


AXES = {
    "politeness": (Style(politeness=4), Style(politeness=0)),
    "correct": (Style(correct=True), Style(correct=False)),
    "ramble": (Style(ramble=0), Style(ramble=2)),
    "harmful": (Style(harmful=False), Style(harmful=True)),
    "refuse": (Style(refuse=False), Style(refuse=True)),
}


@pytest.mark.parametrize("axis", AXES)
def test_each_axis_lowers_the_reward_all_else_equal(axis):
    better, worse = AXES[axis]
    for record in PROMPTS:
        if record["task"] == "redteam" and axis in ("correct", "refuse"):
            continue  # these axes do not apply to red-team prompts
        good = score_response(record, demonstrate(record, better, random.Random(1)).response)
        bad = score_response(record, demonstrate(record, worse, random.Random(1)).response)
        assert good.reward > bad.reward, (axis, record["prompt"], good, bad)


def test_technical_register_raises_complexity():
    benign = [r for r in PROMPTS if r["task"] != "redteam"]
    for record in benign:
        plain = demonstrate(record, Style(verbosity=3), random.Random(0)).response
        technical = demonstrate(record, Style(verbosity=3, technical=True), random.Random(0)).response
        plain, technical = score_response(record, plain), score_response(record, technical)
        assert plain.complexity <= 1 and technical.complexity >= 2, record["prompt"]


def test_noise_presets_give_good_and_mixed_quality():
    good = [score_response(r, Demonstrator(GOOD_NOISE, seed=0).respond(r).response) for r in PROMPTS]
    mixed = [score_response(r, Demonstrator(MIXED_NOISE, seed=0).respond(r).response) for r in PROMPTS]
    assert min(s.reward for s in good) >= 0.9
    assert all(s.correctness == 4 and s.harmlessness == 4 and s.politeness >= 3 for s in good)
    assert statistics.mean(s.reward for s in mixed) < statistics.mean(s.reward for s in good) - 0.1
    for attribute in ("correctness", "politeness", "verbosity", "coherence", "harmlessness"):
        assert len({getattr(s, attribute) for s in mixed}) >= 3, attribute


def test_demonstrator_is_deterministic_and_k_gives_variety():
    a, b = Demonstrator(MIXED_NOISE, seed=5), Demonstrator(MIXED_NOISE, seed=5)
    assert [a.respond(r).response for r in PROMPTS] == [b.respond(r).response for r in PROMPTS]
    other = Demonstrator(MIXED_NOISE, seed=6)
    assert [a.respond(r).response for r in PROMPTS] != [other.respond(r).response for r in PROMPTS]
    assert len({a.respond(PROMPTS[0], k).response for k in range(8)}) > 1
    assert a.respond(PROMPTS[0]) == a.respond(PROMPTS[0]["prompt"])  # a record or its text


def test_filler_sentences_share_no_word_with_task_vocabulary():
    task_words = {w.lower() for w in (*WORDS, *NAMES, *CITIES, *PETS, *COLOURS)}
    filler_words = {w.strip(".,?!").lower() for s in _FILLER for w in s.split()}
    assert not filler_words & task_words
