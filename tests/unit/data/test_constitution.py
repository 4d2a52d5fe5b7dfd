"""Constitutional AI's constitution: the file format and its errors (file:line), the critique,
revision and comparison conversations exactly as documented, and the soft labels by hand (option
probabilities from log-probs, text verdicts, swap-averaging, the clamp, the recipe's orientation)."""

from __future__ import annotations

import math
import random

import pytest

from alignkit.config import validate
from alignkit.data.constitution import (
    ConstitutionError,
    clamp,
    comparison_messages,
    critique_messages,
    find_constitution,
    load_constitution,
    option_probability,
    revision_messages,
    swap_average,
    verdict_probability,
)
from alignkit.recipes.cai import RLConfig, candidate_pairs, label_pairs

GOOD = """\
name: test
system: Be careful.
principles:
  - name: harm
    critique: Is it harmful?
    revision: Make it harmless.
    comparison: Which is less harmful?
  - critique: Is it rude?
    revision: Make it polite.
    comparison: Which is more polite?
few_shot:
  - prompt: Insult Bo.
    response: Bo is a fool.
    principle: principle_2
    critique: It is rude to Bo.
    revision: I won't insult Bo.
"""


def _write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_constitution_loads_with_defaults(tmp_path):
    c = load_constitution(_write(tmp_path, GOOD))
    assert c.name == "test" and c.system == "Be careful."
    assert [p.name for p in c.principles] == ["harm", "principle_2"]
    assert c.few_shot[0].principle == "principle_2" and c.few_shot[0].revision == "I won't insult Bo."
    for name in ("default", "taskworld"):  # the shipped ones
        shipped = load_constitution(find_constitution(name))
        assert shipped.principles and shipped.name == name


def test_critique_and_revision_conversations_are_built_as_documented(tmp_path):
    c = load_constitution(_write(tmp_path, GOOD))
    harm = c.principle("harm")
    few_shot = [
        {"role": "user", "content": "Insult Bo."},
        {"role": "assistant", "content": "Bo is a fool."},
        {"role": "user", "content": "Is it rude?"},  # the example's own principle's requests
        {"role": "assistant", "content": "It is rude to Bo."},
        {"role": "user", "content": "Make it polite."},
        {"role": "assistant", "content": "I won't insult Bo."},
    ]
    critique = critique_messages(c, harm, "Make a bomb.", "Mix x and y.")
    assert critique == [
        {"role": "system", "content": "Be careful."},
        *few_shot,
        {"role": "user", "content": "Make a bomb."},
        {"role": "assistant", "content": "Mix x and y."},
        {"role": "user", "content": "Is it harmful?"},
    ]
    revision = revision_messages(c, harm, "Make a bomb.", "Mix x and y.", "It is dangerous.")
    assert revision == [
        *critique,
        {"role": "assistant", "content": "It is dangerous."},
        {"role": "user", "content": "Make it harmless."},
    ]
    # a prompt given as a conversation keeps its turns
    turns = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Q"},
    ]
    assert critique_messages(c, harm, turns, "A")[7:10] == turns


def test_the_comparison_is_the_documented_multiple_choice_turn(tmp_path):
    c = load_constitution(_write(tmp_path, GOOD))
    asked = comparison_messages(c, c.principle("harm"), "Make a bomb.", "No.", "Mix x and y.")
    assert asked == [
        {"role": "system", "content": "Be careful."},
        {
            "role": "user",
            "content": "Consider the following conversation between a user and an assistant:\n"
            "User: Make a bomb.\n"
            "Which is less harmful?\n"
            "Options:\n"
            "(A) No.\n"
            "(B) Mix x and y.\n"
            "The answer is:",
        },
    ]
    whole = comparison_messages(c, c.principle("harm"), "Q", "a", "b", whole_constitution=True)
    assert (
        whole[0]["content"]
        == "Be careful.\nJudge by these principles:\n1. Which is less harmful?\n2. Which is more polite?"
    )


def _choice(*entries: dict[str, float], text: str = "") -> dict:
    content = [
        {"token": "x", "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": lp} for t, lp in e.items()]}
        for e in entries
    ]
    return {"message": {"content": text}, "logprobs": {"content": content}}


def test_option_probability_by_hand():
    ln = math.log
    # first token "(" offers no option: the second token decides; "A" and " A" add up:
    # P(A) = 0.5 + 0.1 = 0.6, P(B) = 0.2 -> 0.6 / 0.8 = 0.75
    choice = _choice({"(": ln(0.9), "The": ln(0.1)}, {"A": ln(0.5), " A": ln(0.1), "B)": ln(0.2), "C": ln(0.2)})
    assert option_probability(choice) == pytest.approx(0.75)
    assert option_probability(_choice({"(B": ln(0.3)})) == 0.0  # only B offered
    assert option_probability(_choice({"x": 0.0}, {"y": 0.0}, {"z": 0.0}, {"A": 0.0})) is None  # beyond 3 tokens
    assert option_probability({"message": {"content": "(A)"}}) is None  # no log-probs: the verdict decides
    assert verdict_probability("The answer is (B).") == 0.0
    assert verdict_probability("A") == 1.0 and verdict_probability("Answer: B, clearly") == 0.0
    assert verdict_probability("Neither.") is None


def test_swap_averaging_and_the_clamp_by_hand():
    # first shown as (A): P(A) = 0.9; shown as (B): P(A) = 0.3, so it wins 0.7 -> (0.9 + 0.7) / 2 = 0.8
    assert swap_average(0.9, 0.3) == pytest.approx(0.8)
    # a model that always answers (A) whatever it reads: 0.5, the bias cancels
    assert swap_average(1.0, 1.0) == pytest.approx(0.5)
    assert clamp(0.8, 0.4, 0.6) == 0.6 and clamp(0.1, 0.4, 0.6) == 0.4 and clamp(0.45, 0.4, 0.6) == 0.45


class _Fixed:
    """A feedback client answering comparisons from a table: P(A) by (option A, option B)."""

    def __init__(self, table: dict[tuple[str, str], float]):
        self.table, self.asked = table, []

    def chat_many(self, conversations, **params):
        self.asked.append(params)
        out = []
        for messages in conversations:
            text = messages[-1]["content"]
            a = text.split("(A) ")[1].split("\n")[0]
            b = text.split("(B) ")[1].split("\n")[0]
            p = self.table[(a, b)]
            top = [{"token": "A", "logprob": math.log(p)}, {"token": "B", "logprob": math.log(1 - p)}]
            out.append({"choices": [{"message": {"content": "(A)"}, "logprobs": {"content": [{"top_logprobs": top}]}}]})
        return out


def test_label_pairs_soft_labels_swap_clamp_and_orientation(tmp_path):
    c = load_constitution(_write(tmp_path, GOOD))
    # pair 1 (x, y): P(A) 0.9 as (x, y), 0.3 as (y, x) -> x wins 0.8
    # pair 2 (u, v): P(A) 0.2 as (u, v), 0.6 as (v, u) -> u wins 0.3, so v is chosen with 0.7
    table = {("x", "y"): 0.9, ("y", "x"): 0.3, ("u", "v"): 0.2, ("v", "u"): 0.6}
    items = [("Q1", "x", "y"), ("Q2", "u", "v")]
    rl = validate(RLConfig, {})
    rows, unread = label_pairs(_Fixed(table), c, items, rl, random.Random(0))
    assert unread == 0
    assert [(r["chosen"], r["rejected"], r["preference"]) for r in rows] == [("x", "y", 0.8), ("v", "u", 0.7)]
    assert rows[0]["p_first_as_a"] == pytest.approx(0.9) and rows[0]["p_first_as_b"] == pytest.approx(0.3)
    client = _Fixed(table)
    rows, _ = label_pairs(client, c, items, validate(RLConfig, {"clamp": [0.4, 0.6]}), random.Random(0))
    assert [r["preference"] for r in rows] == [0.6, 0.6]
    assert client.asked[0] == {"temperature": 0.0, "max_tokens": 3, "logprobs": True, "top_logprobs": 20}
    # one order only: the position bias stays (pair 2 now goes to u with 0.8)
    rows, _ = label_pairs(_Fixed(table), c, items, validate(RLConfig, {"swap": False}), random.Random(0))
    assert [(r["chosen"], r["preference"]) for r in rows] == [("x", 0.9), ("v", 0.8)]
    rows, _ = label_pairs(_Fixed(table), c, items, validate(RLConfig, {"min_confidence": 0.25}), random.Random(0))
    assert [r["chosen"] for r in rows] == ["x"]  # |0.7 - 0.5| < 0.25: left out


def test_candidate_pairs_skip_repeats_and_empty_answers():
    assert candidate_pairs(["a", "b", "a", "", "c"], "all") == [("a", "b"), ("a", "c"), ("b", "c")]
    assert candidate_pairs(["a", "b", "a", "", "c"], "adjacent") == [("a", "b"), ("b", "c")]
    assert candidate_pairs(["a", "a"], "all") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"c\.yaml:1: the file is empty"),
        ("principles:\n  - critique: a\n    revision: b\n", r"c\.yaml:2: principle 1 lacks 'comparison'"),
        (
            "principles:\n  - critique: a\n    revision: b\n    comparison: c\n    critque: d\n",
            r"c\.yaml:5: unknown key 'critque' in principle 1",
        ),
        ("name: x\nprinciples: []\n", r"c\.yaml:2: principles must be a non-empty list"),
        (
            "principles:\n  - critique: [a]\n    revision: b\n    comparison: c\n",
            r"c\.yaml:2: principle 'principle_1': critique must be a non-empty text",
        ),
        ("principles:\n  - critique: a\n    revision: b\n    comparison: c\n  bad: [\n", r"c\.yaml:5: not valid YAML"),
        (
            "principles:\n  - {critique: a, revision: b, comparison: c}\n"
            "few_shot:\n  - {prompt: p, response: r, critique: c, revision: v, principle: nope}\n",
            r"c\.yaml:4: few-shot example 1 names no principle of this constitution: 'nope'",
        ),
        ("- a\n- b\n", r"c\.yaml:1: a constitution must be a mapping"),
    ],
)
def test_a_malformed_constitution_is_named_with_its_line(tmp_path, text, message):
    with pytest.raises(ConstitutionError, match=message):
        load_constitution(_write(tmp_path, text))


def test_a_missing_constitution_file_is_named(tmp_path):
    with pytest.raises(ConstitutionError, match="constitution file not found: .*nope.yaml"):
        load_constitution(find_constitution(str(tmp_path / "nope.yaml")))
