"""The LLM judge: the client's retries, cache, concurrency and errors against a fake endpoint, both
ways of reading a verdict by hand, and a real judge (a tiny model behind alignkit's OpenAI server on
loopback) agreeing with the same model judged locally."""

from __future__ import annotations

import json
import math
import threading

import httpx
import pytest

from alignkit.config import ConfigError, validate
from alignkit.models.loading import save_causal_lm
from alignkit.rewards import ChatClient, JudgeConfig, JudgeError, JudgeReward, RewardSourceConfig, build_reward_source
from alignkit.serving.openai_server import create_app
from tests.conftest import tiny_model
from tests.unit.serving.test_reward_server import Server


def _answer(content: str, top: dict[str, float] | None = None) -> dict:
    choice: dict = {"message": {"role": "assistant", "content": content}}
    if top is not None:
        entries = [{"token": t, "logprob": lp} for t, lp in top.items()]
        choice["logprobs"] = {"content": [{"token": content, "logprob": 0.0, "top_logprobs": entries}]}
    return {"choices": [choice]}


class FakeEndpoint:
    """An httpx transport: answers each chat request with `reply(body)`, after `fail_first` 500s."""

    def __init__(self, reply, fail_first: int = 0, status: int = 200):
        self.reply, self.fail_first, self.status = reply, fail_first, status
        self.calls, self.lock = 0, threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.calls += 1
            calls = self.calls
        if calls <= self.fail_first:
            return httpx.Response(500, text="busy")
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "no such model"}})
        return httpx.Response(200, json=self.reply(json.loads(request.content)))


def _client(endpoint: FakeEndpoint, **kwargs) -> ChatClient:
    return ChatClient("http://judge.test/v1", "j", backoff_s=0.0, transport=httpx.MockTransport(endpoint), **kwargs)


def test_verdicts_are_parsed_clamped_and_mapped_to_0_1():
    answers = iter(["I would say 7.", "Rating: 10/10", "no idea", "15"])
    judge = JudgeReward(JudgeConfig(url="http://judge.test/v1"), client=_client(FakeEndpoint(lambda b: None)))
    judge.client.chat_many = lambda conversations, **p: [_answer(next(answers)) for _ in conversations]
    out = judge(["q"] * 4, ["a", "b", "c", "d"])
    # the last number: 7 -> 6/9; "10/10" -> 10 -> 1; none -> the minimum, counted; 15 -> clamped to 10
    assert out.rewards.tolist() == pytest.approx([6 / 9, 1.0, 0.0, 1.0])
    assert judge.unparsed == 1


def test_logprobs_give_the_expected_score_over_the_score_tokens():
    top = {"7": math.log(0.5), "8": math.log(0.3), " 9": math.log(0.1), "The": math.log(0.1)}
    endpoint = FakeEndpoint(lambda body: _answer("7", top))
    judge = JudgeReward(JudgeConfig(url="http://judge.test/v1", mode="logprobs"), client=_client(endpoint))
    out = judge(["q"], ["a"])
    expected = (7 * 0.5 + 8 * 0.3 + 9 * 0.1) / 0.9  # renormalised over the score tokens; " 9" counts as 9
    assert float(out.rewards[0]) == pytest.approx((expected - 1) / 9, rel=1e-6)


def test_the_template_fills_prompt_and_response_and_the_request_asks_for_one_token():
    seen = []
    endpoint = FakeEndpoint(lambda body: seen.append(body) or _answer("5", {"5": 0.0}))
    cfg = JudgeConfig(
        url="http://judge.test/v1", mode="logprobs", template="Q: {prompt} A: {response}", system="Be fair."
    )
    JudgeReward(cfg, client=_client(endpoint))([{"prompt": [{"role": "user", "content": "hi"}]}], ["hello"])
    assert seen[0]["messages"] == [
        {"role": "system", "content": "Be fair."},
        {"role": "user", "content": "Q: user: hi A: hello"},
    ]
    assert seen[0]["max_tokens"] == 1 and seen[0]["logprobs"] is True and seen[0]["top_logprobs"] == 20
    with pytest.raises(JudgeError, match=r"must contain \{response\}"):
        JudgeReward(JudgeConfig(url="http://judge.test/v1", template="Q: {prompt}"), client=_client(endpoint))


def test_the_client_retries_caches_and_keeps_order_under_concurrency():
    endpoint = FakeEndpoint(lambda body: _answer(body["messages"][0]["content"]), fail_first=2)
    client = _client(endpoint, retries=3, concurrency=4)
    conversations = [[{"role": "user", "content": str(i)}] for i in range(12)]
    answers = client.chat_many(conversations, max_tokens=1)
    assert [a["choices"][0]["message"]["content"] for a in answers] == [str(i) for i in range(12)]
    calls = endpoint.calls
    client.chat_many(conversations, max_tokens=1)  # identical requests: from the cache
    assert endpoint.calls == calls and client.requests == 12


def test_an_endpoint_that_is_down_or_refusing_is_one_error_naming_it():
    with pytest.raises(JudgeError, match=r"judge http://judge.test/v1 unreachable after 2 attempts \(HTTP 500"):
        _client(FakeEndpoint(lambda b: None, fail_first=99), retries=1).chat([{"role": "user", "content": "x"}])
    with pytest.raises(JudgeError, match="refused the request: HTTP 404"):
        _client(FakeEndpoint(lambda b: None, status=404)).chat([{"role": "user", "content": "x"}])
    dead = ChatClient("http://127.0.0.1:9/v1", retries=0)
    with pytest.raises(JudgeError, match=r"judge http://127.0.0.1:9/v1 unreachable after 1 attempts \(ConnectError"):
        dead.chat([{"role": "user", "content": "x"}])


def test_the_config_needs_a_judge():
    with pytest.raises(ConfigError, match="judge"):
        validate(RewardSourceConfig, {"kind": "judge"})
    with pytest.raises(ConfigError, match="set `url`"):
        validate(RewardSourceConfig, {"kind": "judge", "judge": {"mode": "logprobs"}})


def test_a_served_judge_and_the_same_model_judged_locally_agree(tmp_path, tokenizer):
    model = tiny_model(tokenizer, seed=4).eval()
    model_dir = save_causal_lm(model, model.state_dict(), tokenizer, tmp_path / "judge")
    prompts, responses = ["What is 2 + 2?", "Name a colour."], ["4", "Blue, I think."]
    local = build_reward_source(
        validate(RewardSourceConfig, {"kind": "judge", "judge": {"model": str(model_dir), "mode": "logprobs"}})
    )
    with Server(create_app(model, tokenizer, "judge")) as url:
        cfg = {"kind": "judge", "judge": {"url": f"{url}/v1", "model": "judge", "mode": "logprobs", "top_logprobs": 20}}
        served = build_reward_source(validate(RewardSourceConfig, cfg))
        remote = served(prompts, responses).rewards
        verdict_cfg = {"kind": "judge", "judge": {"url": f"{url}/v1", "model": "judge", "max_tokens": 4}}
        verdicts = build_reward_source(validate(RewardSourceConfig, verdict_cfg))(prompts, responses).rewards
    here = local(prompts, responses).rewards
    assert remote.tolist() == pytest.approx(here.tolist(), abs=1e-5)
    assert all(0.0 <= r <= 1.0 for r in remote.tolist() + verdicts.tolist())
