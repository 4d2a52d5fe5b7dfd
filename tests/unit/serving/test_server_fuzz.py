"""Both servers under a corpus of bad requests, sent concurrently with good ones.

Every bad request gets a 4xx with a JSON error message (never a 5xx, never a dropped
connection), every good request sent at the same time gets exactly the answer it gets alone, and
the server is healthy afterwards. The corpus: hand-written cases (malformed JSON, wrong types,
bad roles, oversize bodies, auth, out-of-range sampling fields, over-long prompts) plus seeded
byte-level mutations of a good body, which may also be accepted (then the answer must be sound).
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from alignkit.rewards import LocalRewardModel
from alignkit.serving import openai_server, reward_server
from tests.conftest import tiny_model
from tests.unit.serving.test_reward_server import PROMPTS, RESPONSES, Server, rm_dir  # noqa: F401 - a fixture

TOKEN = "fuzz-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
BODY_LIMIT = 64 * 1024
MUTATIONS = 40

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 6, "temperature": 0}
COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 6, "temperature": 0}
SCORE = {"prompts": PROMPTS[:2], "responses": RESPONSES[:2]}


def _chat(**change) -> dict:
    return {**CHAT, **change}


def _message(**change) -> dict:
    return _chat(messages=[{"role": "user", "content": "hi", **change}])


OPENAI_CASES: list[tuple[str, object]] = [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b""),
    ("/v1/chat/completions", b"[1, 2]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),  # not UTF-8
    ("/v1/chat/completions", _chat(messages="hi")),
    ("/v1/chat/completions", _chat(messages=[])),
    ("/v1/chat/completions", _chat(messages=[{"content": "hi"}])),
    ("/v1/chat/completions", _message(role="bot")),
    ("/v1/chat/completions", _message(content=5)),
    ("/v1/chat/completions", _message(content=["a"])),
    ("/v1/chat/completions", _message(content=[{"type": "image_url", "image_url": {"url": "data:,"}}])),
    ("/v1/chat/completions", _chat(messages=[[{"role": "user", "content": "hi"}]])),
    ("/v1/chat/completions", _chat(max_tokens=10**9)),
    ("/v1/chat/completions", _chat(max_tokens=0)),
    ("/v1/chat/completions", _chat(max_tokens=-1)),
    ("/v1/chat/completions", _chat(max_tokens="many")),
    ("/v1/chat/completions", _chat(temperature=-1)),
    ("/v1/chat/completions", _chat(top_p=0)),
    ("/v1/chat/completions", _chat(top_p=2)),
    ("/v1/chat/completions", _chat(n=0)),
    ("/v1/chat/completions", _chat(n=1000)),
    ("/v1/chat/completions", _chat(stop=5)),
    ("/v1/chat/completions", _chat(seed="abc")),
    ("/v1/chat/completions", _chat(top_logprobs=2)),  # without logprobs=true
    ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=50)),
    ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f"}}])),
    ("/v1/chat/completions", _chat(attributes={"verbosity": 1})),  # not a SteerLM model
    ("/v1/chat/completions", _message(content="x" * 5000)),  # beyond the context of 64
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 70}),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 60, "max_tokens": 30}),
    ("/v1/completions", {**COMPLETION, "prompt": []}),
    ("/v1/completions", {**COMPLETION, "prompt": [[["a"]]]}),
    ("/v1/completions", {**COMPLETION, "prompt": [-1, 3]}),
    ("/v1/completions", {**COMPLETION, "prompt": [10**12]}),
    ("/v1/completions", {**COMPLETION, "prompt": None}),
    ("/v1/completions", {**COMPLETION, "logprobs": 100}),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * (BODY_LIMIT + 1)}),  # 413
]

SCORE_CASES: list[tuple[str, object]] = [
    ("/score", b"{not json"),
    ("/score", b""),
    ("/score", b'{"prompts": ["\xff"], "responses": ["a"]}'),
    ("/score", {"prompts": "hi", "responses": ["a"]}),
    ("/score", {"prompts": ["hi"], "responses": [1]}),
    ("/score", {"prompts": ["hi"]}),
    ("/score", {"prompts": ["hi", "ho"], "responses": ["a"]}),
    ("/score", {"prompts": [[{"role": "bot", "content": "hi"}]], "responses": ["a"]}),
    ("/score", {"prompts": [[{"role": "user"}]], "responses": ["a"]}),
    ("/score", {"prompts": [[["user", "hi"]]], "responses": ["a"]}),
    ("/score", {"prompts": ["hi"] * 30, "responses": ["a"] * 30}),  # over max_items=20
    ("/score", {"prompts": ["x" * (BODY_LIMIT + 1)], "responses": ["a"]}),  # 413
]


def _mutants(good: dict, seed: int) -> list[bytes]:
    """Seeded byte-level damage to a good body: cut, dropped, inserted and replaced bytes."""
    rng = random.Random(seed)
    raw = json.dumps(good).encode()
    out = []
    for _ in range(MUTATIONS):
        body = bytearray(raw)
        kind = rng.choice(["cut", "drop", "insert", "replace"])
        at = rng.randrange(len(body))
        if kind == "cut":
            del body[at:]
        elif kind == "drop":
            del body[at : at + rng.randint(1, 8)]
        elif kind == "insert":
            body[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        else:
            body[at] = rng.choice(b'{}[]":,0123456789-.e\\ \xff')
        out.append(bytes(body))
    return out


def _send(client: httpx.Client, path: str, body: object, headers: dict) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={**headers, "content-type": "application/json"})
    return client.post(path, json=body, headers=headers)


def _hammer(url: str, bad: list[tuple[str, object]], good: tuple[str, dict], expected) -> list[str]:
    """Send every bad request with a good one after each, 8 at a time; the problems found."""
    jobs = []
    for case in bad:
        jobs += [("bad", case), ("good", good)]
    problems = []

    def one(job):
        kind, (path, body) = job
        with httpx.Client(base_url=url, timeout=60) as client:
            return kind, path, body, _send(client, path, body, AUTH)

    with ThreadPoolExecutor(8) as pool:
        for kind, path, body, response in pool.map(one, jobs):
            shown = repr(body)[:120]
            if kind == "good" and (response.status_code != 200 or not expected(response.json())):
                problems.append(f"good request disturbed: {response.status_code} {response.text[:200]}")
            elif kind == "bad" and response.status_code >= 500:
                problems.append(f"{path} {shown}: {response.status_code} {response.text[:200]}")
            elif kind == "bad" and response.status_code >= 400 and not _has_message(response):
                problems.append(f"{path} {shown}: {response.status_code} without an error message")
    return problems


def _has_message(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    error = body.get("error") or body.get("detail")
    return bool(error)


@pytest.fixture(scope="module")
def openai_url(tokenizer):
    model = tiny_model(tokenizer, seed=2, max_position_embeddings=64).eval()
    app = openai_server.create_app(
        model, tokenizer, "tiny", max_tokens_limit=32, token=TOKEN, max_body_bytes=BODY_LIMIT
    )
    with Server(app) as url:
        yield url


@pytest.fixture(scope="module")
def reward_url(rm_dir):  # noqa: F811 - the fixture imported above
    rm = LocalRewardModel(rm_dir, batch_size=8)
    app = reward_server.create_app(rm.score, names=rm.names, max_items=20, token=TOKEN, max_body_bytes=BODY_LIMIT)
    with Server(app) as url:
        yield url, rm


def test_the_openai_server_refuses_each_bad_request_alone(openai_url):
    with httpx.Client(base_url=openai_url, timeout=60) as client:
        alone = _send(client, "/v1/chat/completions", CHAT, AUTH).json()["choices"][0]["message"]["content"]
        assert client.get("/v1/models").status_code == 401  # no token
        assert client.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
    corpus = OPENAI_CASES + [("/v1/chat/completions", body) for body in _mutants(CHAT, seed=0)]
    corpus += [("/v1/completions", body) for body in _mutants(COMPLETION, seed=1)]
    problems = _hammer(
        openai_url, corpus, ("/v1/chat/completions", CHAT), lambda r: r["choices"][0]["message"]["content"] == alone
    )
    assert not problems, "\n".join(problems)
    for path, body in OPENAI_CASES:  # the hand-written cases are all refused, not accepted
        with httpx.Client(base_url=openai_url, timeout=60) as client:
            assert 400 <= _send(client, path, body, AUTH).status_code < 500, body
    with httpx.Client(base_url=openai_url, timeout=60) as client:
        assert client.get("/v1/models", headers=AUTH).status_code == 200


def test_the_reward_server_refuses_each_bad_request_alone(reward_url):
    url, rm = reward_url
    alone = rm.score(SCORE["prompts"], SCORE["responses"]).rewards.tolist()
    corpus = SCORE_CASES + [("/score", body) for body in _mutants(SCORE, seed=2)]
    problems = _hammer(url, corpus, ("/score", SCORE), lambda r: r["rewards"] == pytest.approx(alone, abs=1e-5))
    assert not problems, "\n".join(problems)
    with httpx.Client(base_url=url, timeout=60) as client:
        for path, body in SCORE_CASES:
            assert 400 <= _send(client, path, body, AUTH).status_code < 500, body
        assert client.post("/score", json=SCORE).status_code == 401
        assert client.get("/health", headers=AUTH).json()["status"] == "ok"
