"""`alignkit serve generate --backend vllm`: the OpenAI-compatible server sampling on an in-process
vLLM engine, started for real on loopback and used through the `openai` package, against the same
server on the native engine (the same model: greedy text, log-probs, top log-probs, stop strings,
streaming). vLLM's CPU attention needs a head size of at least 32: the model has 2 heads of 32."""

from __future__ import annotations

import openai
import pytest

from alignkit.config import SamplingConfig, VLLMConfig
from alignkit.generation.engine import build_engine
from alignkit.serving.openai_server import create_app
from tests.unit.generation.test_vllm_backend import vllm_tiny_model
from tests.unit.serving.test_reward_server import Server


@pytest.fixture(scope="module")
def clients(tokenizer):
    model = vllm_tiny_model(tokenizer, seed=3).eval()
    engine = build_engine(model, tokenizer, SamplingConfig(backend="vllm", vllm=VLLMConfig(max_model_len=256)))
    with (
        Server(create_app(model, tokenizer, "tiny", max_tokens_limit=32, engine=engine)) as vllm_url,
        Server(create_app(model, tokenizer, "tiny", max_tokens_limit=32)) as native_url,
    ):
        yield tuple(openai.OpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0) for u in (vllm_url, native_url))


def test_vllm_server_completions_equal_the_native_server(clients):
    """Greedy text, finish reasons, usage and the sampled tokens' log-probs with their top 3."""
    answers = [
        c.completions.create(model="tiny", prompt=["hello", "ab"], max_tokens=10, temperature=0, logprobs=3)
        for c in clients
    ]
    vllm_out, native_out = answers
    assert [ch.text for ch in vllm_out.choices] == [ch.text for ch in native_out.choices]
    assert [ch.finish_reason for ch in vllm_out.choices] == [ch.finish_reason for ch in native_out.choices]
    assert vllm_out.usage == native_out.usage
    for a, b in zip(vllm_out.choices, native_out.choices):
        assert a.logprobs.tokens == b.logprobs.tokens
        assert a.logprobs.token_logprobs == pytest.approx(b.logprobs.token_logprobs, abs=1e-4)
        # the legacy API keys the top 3 by their text, so two ids that decode alike share a key
        for top_a, top_b in zip(a.logprobs.top_logprobs, b.logprobs.top_logprobs):
            assert 1 <= len(top_a) <= 3 and top_a == pytest.approx(top_b, abs=1e-4)


def test_vllm_server_chat_stop_strings_and_streaming(clients, tokenizer):
    """A chat answer cut at a stop string is the native server's; streamed, the same text arrives."""
    vllm_client, native_client = clients
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    free = native_client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    stop = free.choices[0].message.content[3:5]  # a string the greedy answer contains
    asked = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0, "stop": [stop]}
    vllm_answer = vllm_client.chat.completions.create(**asked).choices[0]
    native_answer = native_client.chat.completions.create(**asked).choices[0]
    assert vllm_answer.message.content == native_answer.message.content
    assert stop not in vllm_answer.message.content and vllm_answer.finish_reason == "stop"
    streamed = vllm_client.chat.completions.create(**{**asked, "stop": None}, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == free.choices[0].message.content
