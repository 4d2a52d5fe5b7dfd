"""The feedback/judge clients' on-disk cache (answers appended as they arrive, read back at start, a
line cut short by a kill skipped) and the errors of a slow endpoint."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from alignkit.models.loading import save_causal_lm
from alignkit.rewards.judge import ChatClient, JudgeError, LocalChat
from tests.conftest import tiny_model
from tests.unit.rewards.test_judge import FakeEndpoint, _answer


def _client(endpoint: FakeEndpoint, path, **kwargs) -> ChatClient:
    transport = httpx.MockTransport(endpoint)
    return ChatClient("http://judge.test/v1", "j", backoff_s=0.0, transport=transport, cache_path=path, **kwargs)


def test_answers_are_written_as_they_arrive_and_reused_by_a_new_client(tmp_path):
    path = tmp_path / "cache.jsonl"
    endpoint = FakeEndpoint(lambda body: _answer(body["messages"][0]["content"].upper()))
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    first = _client(endpoint, path, concurrency=3)
    first.chat_many(conversations[:4], max_tokens=2)
    assert len(path.read_text().splitlines()) == 4 and endpoint.calls == 4
    # a new client (a restarted run) asks only what the file does not hold
    second = _client(endpoint, path)
    answers = second.chat_many(conversations, max_tokens=2)
    assert [a["choices"][0]["message"]["content"] for a in answers] == [f"Q{i}" for i in range(6)]
    assert second.requests == 2 and endpoint.calls == 6 and second.cache.loaded == 4
    # other sampling settings are other requests
    second.chat_many(conversations[:1], max_tokens=3)
    assert endpoint.calls == 7


def test_a_line_cut_short_by_a_kill_is_asked_again(tmp_path):
    path = tmp_path / "cache.jsonl"
    endpoint = FakeEndpoint(lambda body: _answer("ok"))
    _client(endpoint, path).chat_many([[{"role": "user", "content": c}] for c in "ab"])
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write
    client = _client(endpoint, path)
    assert client.cache.loaded == 1
    client.chat_many([[{"role": "user", "content": c}] for c in "ab"])
    assert client.requests == 1


def test_local_chat_caches_on_disk_too(tmp_path, tokenizer):
    model = tiny_model(tokenizer, seed=2).eval()
    model_dir = save_causal_lm(model, model.state_dict(), tokenizer, tmp_path / "m")
    path = tmp_path / "cache.jsonl"
    conversations = [[{"role": "user", "content": c}] for c in ("hi", "yo")]
    first = LocalChat(str(model_dir), cache_path=path)
    answers = first.chat_many(conversations, max_tokens=4, logprobs=True, top_logprobs=2)
    again = LocalChat.from_model(model, tokenizer, str(model_dir), cache_path=path)
    assert again.chat_many(conversations, max_tokens=4, logprobs=True, top_logprobs=2) == json.loads(
        json.dumps(answers)
    )
    assert first.requests == 2 and again.requests == 0


def test_a_slow_endpoint_is_one_error_naming_it(tmp_path):
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        held = []
        thread = threading.Thread(target=lambda: held.append(listener.accept()), daemon=True)
        thread.start()
        client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", timeout_s=0.3, retries=0)
        with pytest.raises(
            JudgeError, match=rf"judge http://127.0.0.1:{port}/v1 unreachable after 1 attempts \(ReadTimeout"
        ):
            client.chat([{"role": "user", "content": "x"}])
        for connection, _ in held:
            connection.close()
