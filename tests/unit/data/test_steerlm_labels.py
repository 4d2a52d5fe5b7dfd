"""SteerLM attribute labels: formatting (clip, round, order), parsing, and clear errors."""

import pytest

from alignkit.data.steerlm import LabelError, format_attribute_label, parse_attribute_label

NAMES = ("helpfulness", "correctness", "verbosity")


def test_format_clips_rounds_and_orders():
    values = {"verbosity": -0.4, "helpfulness": 3.6, "correctness": 2.5, "extra": 9}
    assert format_attribute_label(values, NAMES) == "helpfulness:4,correctness:3,verbosity:0"
    assert (
        format_attribute_label({"helpfulness": 7.2, "correctness": 1.49, "verbosity": 2}, NAMES)
        == "helpfulness:4,correctness:1,verbosity:2"
    )


def test_round_trip():
    label = "helpfulness:4,correctness:0,verbosity:2"
    assert format_attribute_label(parse_attribute_label(label, NAMES), NAMES) == label
    assert parse_attribute_label(" helpfulness:1 , correctness:2,verbosity:3 ", NAMES) == {
        "helpfulness": 1,
        "correctness": 2,
        "verbosity": 3,
    }
    assert parse_attribute_label("anything:3", names=None) == {"anything": 3}


@pytest.mark.parametrize(
    "label, message",
    [
        ("", "empty attribute label"),
        ("helpfulness=4", "is not name:level"),
        ("helpfulness:high,correctness:1,verbosity:1", "level 'high' of 'helpfulness' is not an integer"),
        ("helpfulness:5,correctness:1,verbosity:1", "level 5 of 'helpfulness' is outside 0..4"),
        ("helpfulness:1,helpfulness:1", "appears twice"),
        ("helpfulness:1,correctness:1", r"missing \['verbosity'\]"),
        ("helpfulness:1,correctness:1,verbosity:1,humor:2", r"unknown \['humor'\]"),
        ("correctness:1,helpfulness:1,verbosity:1", "out of order"),
    ],
)
def test_bad_labels_say_what_is_wrong(label, message):
    with pytest.raises(LabelError, match=message):
        parse_attribute_label(label, NAMES)


def test_format_needs_every_attribute():
    with pytest.raises(LabelError, match="no value for attribute 'verbosity'"):
        format_attribute_label({"helpfulness": 1, "correctness": 1}, NAMES)
    with pytest.raises(LabelError, match="non-finite"):
        format_attribute_label({"helpfulness": float("nan"), "correctness": 1, "verbosity": 1}, NAMES)
