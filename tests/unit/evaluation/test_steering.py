"""attribute_control on a saved tiny model: every (attribute, level) is asked, the oracle measures."""

import pytest

from alignkit.config import SamplingConfig
from alignkit.data.steerlm import SteerLMFormat
from alignkit.evaluation import steering
from alignkit.models.tokenizer import byte_tokenizer
from tests.conftest import tiny_model

FMT = SteerLMFormat(("verbosity", "politeness"), defaults={"verbosity": 1, "politeness": 3})
PROMPTS = [{"prompt": "What is 2 + 3?"}, {"prompt": "Reverse the word 'stone'."}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = byte_tokenizer()
    root = tmp_path_factory.mktemp("steer")
    plain = tiny_model(tok, seed=0)
    plain.save_pretrained(root / "plain")
    tok.save_pretrained(root / "plain")
    plain.config.steerlm = FMT.to_config()
    plain.save_pretrained(root / "steer")
    tok.save_pretrained(root / "steer")
    return root


def test_every_level_is_requested_and_measured(saved, monkeypatch):
    asked_labels = []
    real = steering.sample_responses

    def spy(model, tokenizer, prompts, params, steer=None, **kw):
        asked_labels.extend(steer.label(p["attributes"]) for p in prompts)
        return real(model, tokenizer, prompts, params, steer=steer, **kw)

    monkeypatch.setattr(steering, "sample_responses", spy)
    params = SamplingConfig(max_new_tokens=4, temperature=0.0)
    m = steering.attribute_control(saved / "steer", PROMPTS, ["verbosity", "politeness"], {"politeness": 4}, params)
    # verbosity 0..4 with politeness 4 asked, then politeness 0..4 with verbosity at its default 1
    assert asked_labels[:2] == ["verbosity:0,politeness:4"] * 2
    assert asked_labels[10:12] == ["verbosity:1,politeness:0"] * 2 and len(asked_labels) == 20
    for name in ("verbosity", "politeness"):
        assert len(m[f"{name}_by_level"]) == 5 and -1 <= m[f"{name}_spearman"] <= 1
        assert 0 <= m[f"{name}_accuracy"] <= 1
    assert m["attribute_accuracy"] == pytest.approx((m["verbosity_accuracy"] + m["politeness_accuracy"]) / 2)


def test_a_plain_model_is_measured_only_with_borrowed_labels(saved):
    params = SamplingConfig(max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="not a SteerLM model"):
        steering.attribute_control(saved / "plain", PROMPTS, ["verbosity"], params=params)
    m = steering.attribute_control(saved / "plain", PROMPTS, ["verbosity"], params=params, steer=FMT)
    assert set(m) == {"verbosity_spearman", "verbosity_accuracy", "verbosity_by_level", "attribute_accuracy"}
