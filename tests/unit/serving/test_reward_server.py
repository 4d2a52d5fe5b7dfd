"""The reward server, started for real on loopback: batching across concurrent clients, bad
requests, auth, size limits, and the HTTP reward source against it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from transformers import AutoModelForSequenceClassification

from alignkit.config import ModelConfig, RandomInitConfig
from alignkit.models.loading import load_sequence_scorer, save_causal_lm
from alignkit.models.reward import RewardModelInfo
from alignkit.rewards import LocalRewardModel, RemoteRewardModel, RewardSourceError
from alignkit.serving.reward_server import create_app
from tests.conftest import REPO

TINY = RandomInitConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
PROMPTS = [f"what is {i} + {i}?" for i in range(12)]
RESPONSES = [f"{2 * i}" + " indeed" * (i % 3) for i in range(12)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tokenizer):
    model = load_sequence_scorer(ModelConfig(random_init=TINY), tokenizer, 2)
    with torch.no_grad():
        torch.manual_seed(3)
        model.score.weight.normal_()
    info = RewardModelInfo(["helpfulness", "verbosity"], [0.5, 0.5], mean=0.1, std=2.0)
    return save_causal_lm(
        model,
        model.state_dict(),
        tokenizer,
        tmp_path_factory.mktemp("rm") / "final",
        auto_class=AutoModelForSequenceClassification,
        config_updates=info.config_updates(),
    )


class Server:
    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(rm_dir):
    rm = LocalRewardModel(rm_dir, batch_size=8)
    calls = []

    def scorer(prompts, responses):
        calls.append(len(responses))
        return rm.score(prompts, responses)

    app = create_app(scorer, names=rm.names, max_batch=16, max_delay_ms=50, max_items=20)
    with Server(app) as url:
        yield url, rm, calls


def test_scores_equal_local_scoring(served):
    url, rm, _ = served
    answer = httpx.post(f"{url}/score", json={"prompts": PROMPTS[:3], "responses": RESPONSES[:3]})
    assert answer.status_code == 200
    local = rm.score(PROMPTS[:3], RESPONSES[:3])
    assert answer.json()["rewards"] == pytest.approx(local.rewards.tolist(), abs=1e-5)
    torch.testing.assert_close(torch.tensor(answer.json()["attributes"]), local.attributes, atol=1e-5, rtol=1e-5)
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["names"] == ["helpfulness", "verbosity"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_scores(served):
    url, rm, calls = served
    calls.clear()
    local = rm.score(PROMPTS, RESPONSES).rewards.tolist()

    def one(i):
        r = httpx.post(
            f"{url}/score", json={"prompts": PROMPTS[2 * i : 2 * i + 2], "responses": RESPONSES[2 * i : 2 * i + 2]}
        )
        return i, r.status_code, r.json()["rewards"]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    for i, status, rewards in results:
        assert status == 200 and rewards == pytest.approx(local[2 * i : 2 * i + 2], abs=1e-5)
    assert sum(calls) == 12 and len(calls) < 6  # several requests shared a forward batch
    assert max(calls) <= 16


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"prompts": ["a"]}, 422, "responses"),
        ({"prompts": ["a", "b"], "responses": ["x"]}, 422, "2 prompts but 1 responses"),
        ({"prompts": ["a"] * 21, "responses": ["x"] * 21}, 413, "the limit is 20"),
        ({"prompts": [3], "responses": ["x"]}, 422, "prompts"),
        (
            {"prompts": [[{"role": "bot", "content": "hi"}]], "responses": ["x"]},
            422,
            "prompts[0]: message 0 has role 'bot'",
        ),
        (
            {"prompts": ["a", [{"role": "user"}]], "responses": ["x", "y"]},
            422,
            "prompts[1]: message 0 has no field 'content'",
        ),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(served, body, status, message):
    url, _, _ = served
    answer = httpx.post(f"{url}/score", json=body)
    assert answer.status_code == status and message in answer.text


def test_malformed_json_and_oversized_bodies(served):
    url, _, _ = served
    answer = httpx.post(f"{url}/score", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 422
    big = httpx.post(f"{url}/score", content=b"x" * (9 * 2**20), headers={"content-type": "application/json"})
    assert big.status_code == 413 and "limit" in big.text


def test_bearer_token(rm_dir):
    rm = LocalRewardModel(rm_dir)
    with Server(create_app(rm.score, token="s3cret")) as url:
        body = {"prompts": ["a"], "responses": ["b"]}
        assert httpx.post(f"{url}/score", json=body).status_code == 401
        assert httpx.post(f"{url}/score", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.post(f"{url}/score", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert RemoteRewardModel(url, token="s3cret")(["a"], ["b"]).rewards.shape == (1,)
        with pytest.raises(RewardSourceError, match=r"refused the request: HTTP 401"):
            RemoteRewardModel(url, retries=0)(["a"], ["b"])


def test_remote_source_matches_the_local_model_and_names_an_unreachable_url(served):
    url, rm, _ = served
    out = RemoteRewardModel(url)([{"prompt": p} for p in PROMPTS[:4]], RESPONSES[:4])
    torch.testing.assert_close(out.rewards, rm.score(PROMPTS[:4], RESPONSES[:4]).rewards, atol=1e-5, rtol=1e-5)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RewardSourceError, match=rf"reward server {dead} unreachable after 2 attempts \(ConnectError"):
        RemoteRewardModel(dead, retries=1, backoff_s=0.01)(["a"], ["b"])


def test_cli_serves_a_model_on_loopback(rm_dir):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignkit.cli", "serve", "reward", "--model", str(rm_dir), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.ConnectError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.time() < deadline
                time.sleep(0.2)
        assert health.json()["names"] == ["helpfulness", "verbosity"]
        answer = httpx.post(f"http://127.0.0.1:{port}/score", json={"prompts": ["a"], "responses": ["b"]})
        assert answer.status_code == 200 and len(answer.json()["rewards"]) == 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_failing_request_fails_alone_in_its_batch():
    """A request the scorer cannot score (here: a response containing "boom") gets its 500; the
    valid requests batched with it get their scores, and the server stays healthy."""

    def scorer(prompts, responses):
        if any("boom" in r for r in responses):
            raise ValueError("cannot score this one")
        return type(
            "Out", (), {"rewards": torch.tensor([float(len(r)) for r in responses]), "attributes": None, "names": []}
        )()

    app = create_app(scorer, max_batch=64, max_delay_ms=200)
    with Server(app) as url:
        bodies = [{"prompts": ["q"], "responses": ["boom" if i == 3 else "x" * i]} for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{url}/score", json=b, timeout=30), bodies))
        assert [a.status_code for a in answers] == [200, 200, 200, 500, 200, 200, 200, 200]
        assert "cannot score this one" in answers[3].text
        assert [a.json()["rewards"] for i, a in enumerate(answers) if i != 3] == [
            [float(i)] for i in range(8) if i != 3
        ]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
