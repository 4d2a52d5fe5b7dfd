"""`alignkit serve generate --backend vllm`: the OpenAI-compatible server sampling on an in-process
vLLM engine, started through the real CLI in a process of its own (served from inside a test
worker, after hundreds of other tests, a request once hung: a vLLM engine takes up process-wide
state, such as a torch.distributed group it finds) and used through the `openai` package, against
the same model served in-process on the
native engine: greedy text, log-probs, top log-probs, stop strings, streaming. vLLM's CPU attention
needs a head size of at least 32: the model has 2 heads of 32."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from alignkit.models.loading import save_causal_lm
from alignkit.serving.openai_server import create_app
from tests.conftest import REPO
from tests.unit.generation.test_vllm_backend import vllm_tiny_model
from tests.unit.serving.test_reward_server import Server, free_port


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)  # a hang fails


@pytest.fixture(scope="module")
def clients(tokenizer, tmp_path_factory):
    model = vllm_tiny_model(tokenizer, seed=3).eval()
    directory = tmp_path_factory.mktemp("served") / "model"
    save_causal_lm(model, model.state_dict(), tokenizer, directory)
    port = free_port()
    command = [sys.executable, "-m", "alignkit.cli", "serve", "generate", "--model", str(directory)]
    proc = subprocess.Popen(
        [*command, "--name", "tiny", "--port", str(port), "--max-tokens-limit", "32", "--backend", "vllm"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180  # the vLLM engine's start-up: ~15 s alone, more under load
        while True:
            try:
                httpx.get(f"{url}/v1/models")
                break
            except httpx.ConnectError:
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                assert time.time() < deadline, "the vLLM server did not start in 180 s"
                time.sleep(0.5)
        with Server(create_app(model, tokenizer, "tiny", max_tokens_limit=32)) as native_url:
            yield _client(url), _client(native_url)
    finally:
        proc.terminate()
        proc.wait(30)


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
