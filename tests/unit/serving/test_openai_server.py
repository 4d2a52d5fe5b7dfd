"""The OpenAI-compatible server, started for real on loopback and used through the `openai` package."""

from __future__ import annotations

import openai
import pytest
import torch

from alignkit.config import SamplingConfig
from alignkit.generation.sampler import generate
from alignkit.serving.openai_server import create_app
from tests.conftest import tiny_model
from tests.unit.serving.test_reward_server import Server


@pytest.fixture(scope="module")
def served(tokenizer):
    model = tiny_model(tokenizer, seed=2, max_position_embeddings=64).eval()
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
    with pytest.raises(openai.BadRequestError, match="maximum context length is 64 tokens; the prompt has 70"):
        client.completions.create(model="tiny", prompt="x" * 70, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="the prompt has 60 and max_tokens asks for 8 more"):
        client.completions.create(model="tiny", prompt="x" * 60, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="token id 100000 is outside the vocabulary"):
        client.completions.create(model="tiny", prompt=[1, 2, 100000], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="content parts of type image_url"):
        image = {"type": "image_url", "image_url": {"url": "data:,"}}
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [image]}], max_tokens=2)
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


def _direct(model, tokenizer, ids, max_new_tokens, **kwargs):
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0)
    return generate(model, [ids], sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.decode, **kwargs)[
        0
    ]


def test_without_max_tokens_an_answer_gets_the_context_that_is_left(served):
    client, _ = served
    out = client.completions.create(model="tiny", prompt="x" * 60, temperature=0)
    assert out.usage.completion_tokens <= 4


def test_streaming_sends_the_same_text_as_one_response(served):
    client, _ = served
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(chunks) > 3  # token by token, not one piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    plain = client.completions.create(model="tiny", prompt="ab", max_tokens=10, temperature=0, n=2)
    streamed = client.completions.create(model="tiny", prompt="ab", max_tokens=10, temperature=0, n=2, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in plain.choices]


def test_streaming_holds_back_text_until_a_stop_string_is_ruled_out(served):
    client, _ = served
    whole = client.completions.create(model="tiny", prompt="ab", max_tokens=16, temperature=0)
    stop = whole.choices[0].text[5:8]  # a stop string inside the greedy answer
    cut = client.completions.create(model="tiny", prompt="ab", max_tokens=16, temperature=0, stop=[stop])
    streamed = client.completions.create(
        model="tiny", prompt="ab", max_tokens=16, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert stop not in cut.choices[0].text


def test_logprobs_are_the_models_own(served, tokenizer):
    client, model = served
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 2?"}]}]
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    joined = [{"role": "user", "content": "What is\n2 + 2?"}]  # text parts are joined with newlines
    ids = tokenizer(tokenizer.apply_chat_template(joined, tokenize=False, add_generation_prompt=True))["input_ids"]
    direct = _direct(model, tokenizer, ids, 5, top_logprobs=3)
    content = out.choices[0].logprobs.content
    kept = [i for i, t in enumerate(direct.token_ids) if t != tokenizer.eos_token_id]
    assert [c.logprob for c in content] == pytest.approx([direct.logprobs[i] for i in kept], abs=1e-5)
    for entry in content:  # greedy: the chosen token is the most likely one, listed first
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob

    legacy = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0, logprobs=2)
    assert legacy.choices[0].text == direct.text  # a token-id prompt is the same prompt
    assert legacy.choices[0].logprobs.token_logprobs == pytest.approx(content and [c.logprob for c in content])
    lp = legacy.choices[0].logprobs  # top_logprobs maps text to log-prob: pieces that decode alike merge
    assert all(1 <= len(top) <= 2 and token in top for token, top in zip(lp.tokens, lp.top_logprobs))
    streamed = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, stream=True
    )
    lps = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert lps == pytest.approx([c.logprob for c in content])


def test_prompt_logprobs_score_the_prompt_as_a_forward_pass(served, tokenizer):
    """vLLM's extension, in vLLM's shape: per prompt token after the first, {id: {logprob, rank,
    decoded_token}} for the token there and the k most likely, under the model's own distribution."""
    client, model = served
    ids = tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    out = client.completions.create(
        model="tiny", prompt=[ids, ids[:3]], max_tokens=1, extra_body={"prompt_logprobs": 4}
    )
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)  # (L-1, V)
    for choice, prompt in zip(out.choices, [ids, ids[:3]]):
        entries = choice.model_extra["prompt_logprobs"]
        assert len(entries) == len(prompt) and entries[0] is None
        for t, entry in enumerate(entries[1:]):
            top = logps[t].topk(4)
            expected = {int(i): float(v) for i, v in zip(top.indices, top.values)}
            expected[prompt[t + 1]] = float(logps[t, prompt[t + 1]])
            assert {int(k): v["logprob"] for k, v in entry.items()} == pytest.approx(expected, abs=1e-5)
            rank = int((logps[t] > logps[t, prompt[t + 1]]).sum()) + 1
            assert entry[str(prompt[t + 1])]["rank"] == rank
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs is not available with stream"):
        client.completions.create(
            model="tiny", prompt=ids, max_tokens=1, stream=True, extra_body={"prompt_logprobs": 1}
        )


def test_tool_and_developer_messages_reach_the_template(served, tokenizer):
    client, model = served
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "", "tool_calls": [_CALL]},
        {"role": "tool", "content": "4", "tool_call_id": "call_1"},
    ]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    rendered = [{"role": "system", "content": "Be brief."}] + messages[1:]
    text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    assert out.choices[0].message.content == _direct(model, tokenizer, tokenizer(text)["input_ids"], 4).text


_CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}


def test_a_token_is_required_when_set(tokenizer):
    import httpx

    model = tiny_model(tokenizer, seed=2).eval()
    with Server(create_app(model, tokenizer, "tiny", token="s3cret", max_body_bytes=2000)) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == "tiny"
        big = httpx.post(
            f"{url}/v1/completions", json={"prompt": "x" * 5000}, headers={"authorization": "Bearer s3cret"}
        )
        assert big.status_code == 413 and "limit is 2000" in big.json()["error"]["message"]
