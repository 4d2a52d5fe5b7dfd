"""The OpenAI-compatible server, started for real on loopback and used through the `openai` package."""

from __future__ import annotations

import openai
import pytest

from alignkit.config import SamplingConfig
from alignkit.generation.sampler import generate
from alignkit.serving.openai_server import create_app
from tests.conftest import tiny_model
from tests.unit.serving.test_reward_server import Server


@pytest.fixture(scope="module")
def served(tokenizer):
    model = tiny_model(tokenizer, seed=2).eval()
    with Server(create_app(model, tokenizer, "tiny", max_tokens_limit=32)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), model


def test_models_lists_the_served_model(served):
    client, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completions_match_the_engine(served, tokenizer):
    client, model = served
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0, n=2)
    assert len(out.choices) == 2 and out.choices[0].text == out.choices[1].text  # greedy
    ids = tokenizer("hello", add_special_tokens=False)["input_ids"]
    direct = generate(
        model,
        [ids],
        SamplingConfig(max_new_tokens=8, temperature=0),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.decode,
    )[0]
    assert out.choices[0].text == direct.text
    assert out.choices[0].finish_reason == ("stop" if direct.is_end else "length")
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 2 * len(direct.token_ids)


def test_chat_completions_use_the_chat_template(served, tokenizer):
    client, model = served
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, seed=1)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    direct = generate(
        model,
        [ids],
        SamplingConfig(max_new_tokens=6, temperature=0),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.decode,
    )[0]
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == direct.text
    sampled = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=3, seed=5)
    assert len(sampled.choices) == 3


def test_bad_requests_are_refused_with_a_message(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="above this server's limit 32"):
        client.completions.create(model="tiny", prompt="x", max_tokens=100)
    with pytest.raises(openai.BadRequestError, match="stream=true is not supported"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, stream=True)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)


def test_steerlm_models_take_attributes_and_plain_models_refuse_them(served, tokenizer):
    from alignkit.data.steerlm import SteerLMFormat

    client, _ = served
    with pytest.raises(openai.BadRequestError, match="not a SteerLM model"):
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            extra_body={"attributes": {"verbosity": 0}},
        )
    fmt = SteerLMFormat(("verbosity", "politeness"), defaults={"verbosity": 1, "politeness": 3})
    model = tiny_model(tokenizer, seed=3).eval()
    model.config.steerlm = fmt.to_config()
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    with Server(create_app(model, tokenizer, "steer", max_tokens_limit=32)) as url:
        steer = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        out = steer.chat.completions.create(
            model="steer", messages=messages, max_tokens=6, temperature=0, extra_body={"attributes": {"verbosity": 4}}
        )
        assert out.model_extra["alignkit_label"] == "verbosity:4,politeness:3"
        text = (
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            + "[verbosity:4,politeness:3]\n"
        )
        direct = generate(
            model,
            [tokenizer(text, add_special_tokens=False)["input_ids"]],
            SamplingConfig(max_new_tokens=6, temperature=0),
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            tokenizer.decode,
        )[0]
        assert out.choices[0].message.content == direct.text
        default = steer.chat.completions.create(model="steer", messages=messages, max_tokens=2, temperature=0)
        assert default.model_extra["alignkit_label"] == "verbosity:1,politeness:3"
        with pytest.raises(openai.BadRequestError, match="did you mean 'politeness'"):
            steer.chat.completions.create(
                model="steer", messages=messages, max_tokens=2, extra_body={"attributes": "politenes:2"}
            )
