"""SteerLM conversations: where the label goes, what carries loss, how requests fill in defaults."""

import pytest

from alignkit.data.io import DataError
from alignkit.data.steerlm import LabelError, SteerLMFormat, encode_steerlm, record_targets, steered_prompt
from alignkit.data.tokenize import IGNORE
from alignkit.models.tokenizer import byte_tokenizer

FMT = SteerLMFormat(("verbosity", "politeness"), defaults={"verbosity": 1, "politeness": 3})
CONVERSATION = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]


def test_label_sits_in_the_assistant_header_and_only_the_response_carries_loss():
    tok = byte_tokenizer()
    example = encode_steerlm(tok, CONVERSATION, FMT.label_line({"verbosity": 0}), None, "x")
    assert (
        tok.decode(example.input_ids)
        == "<|user|>\nWhat is 2 + 2?</s><|assistant|>\n[verbosity:0,politeness:3]\nIt is 4.</s>"
    )
    learned = [t for t in example.target_ids if t != IGNORE]
    assert tok.decode(learned) == "It is 4.</s>"  # not the label, not the prompt


def test_inference_prompt_is_the_training_prefix():
    tok = byte_tokenizer()
    line = FMT.label_line("verbosity:4")
    prompt = steered_prompt(tok, CONVERSATION[:1], FMT, "verbosity:4")
    example = encode_steerlm(tok, CONVERSATION, line, None, "x")
    assert tok.decode(example.input_ids).startswith(prompt)
    assert prompt.endswith("<|assistant|>\n[verbosity:4,politeness:3]\n")


def test_requests_fill_defaults_and_reject_unknown_names():
    assert FMT.targets(None) == {"verbosity": 1, "politeness": 3}
    assert FMT.targets({"politeness": 0.4}) == {"verbosity": 1, "politeness": 0}
    assert FMT.label("politeness:4,verbosity:2") == "verbosity:2,politeness:4"  # the model's order
    with pytest.raises(LabelError, match="did you mean 'verbosity'"):
        FMT.targets({"verbosty": 2})
    with pytest.raises(LabelError, match="no target for attribute"):
        SteerLMFormat(("a", "b")).targets({"a": 1})


def test_plain_models_refuse_attributes_instead_of_ignoring_them():
    tok = byte_tokenizer()
    assert steered_prompt(tok, CONVERSATION[:1], None).endswith("<|assistant|>\n")
    with pytest.raises(LabelError, match="not a SteerLM model"):
        steered_prompt(tok, CONVERSATION[:1], None, {"verbosity": 1})


def test_format_round_trips_through_a_model_config():
    class Config:
        steerlm = FMT.to_config()

    assert SteerLMFormat.from_config(Config()) == FMT
    assert SteerLMFormat.from_config(object()) is None
    with pytest.raises(LabelError, match="placeholder"):
        SteerLMFormat(label_template="no placeholder")


def test_record_targets_from_label_attributes_or_nemo_conversations():
    names = ("verbosity", "politeness")
    assert record_targets({"label": "verbosity:2,politeness:1"}, names, "f:1") == {"verbosity": 2, "politeness": 1}
    assert record_targets({"attributes": {"verbosity": 3.6, "politeness": -1, "x": 9}}, names, "f:1") == {
        "verbosity": 4,
        "politeness": 0,
    }
    nemo = {
        "conversations": [
            {"from": "User", "value": "hi"},
            {"from": "Assistant", "value": "hello", "label": "verbosity:0,politeness:4"},
        ]
    }
    assert record_targets(nemo, names, "f:1") == {"verbosity": 0, "politeness": 4}
    with pytest.raises(DataError, match="f:3: label 'verbosity:2'"):
        record_targets({"label": "verbosity:2"}, names, "f:3")
    with pytest.raises(DataError, match="f:4: a SteerLM record needs a 'label'"):
        record_targets({"prompt": "p", "response": "r"}, names, "f:4")


def test_the_response_must_be_last():
    with pytest.raises(DataError, match="must end with the assistant response"):
        encode_steerlm(byte_tokenizer(), CONVERSATION[:1], FMT.label_line(), None, "f:2")


def test_most_common_levels_break_ties_upwards():
    labels = [{"v": 1}, {"v": 1}, {"v": 3}, {"v": 3}, {"v": 0}]
    assert SteerLMFormat.most_common_levels(labels, ["v"]) == {"v": 3}
