"""An LLM as the judge: a generative model grades each response against a rubric, and its verdict
(or its probabilities over the score tokens) becomes the reward.

    reward:
      kind: judge
      judge:
        url: http://127.0.0.1:8000/v1      # any OpenAI-compatible server (vLLM, alignkit serve generate, ...)
        model: my-judge                     # the name it serves; without url: a local HF directory
        mode: logprobs                      # or verdict: parse the number it writes
        template: "@rubric.txt"             # {prompt} and {response} are filled in

Two ways to read the judge (Zheng et al. 2023, "Judging LLM-as-a-Judge"; G-Eval, Liu et al.
2023, for the probability-weighted score):
- `verdict`: the judge writes its answer; the last number in it (`pattern`) is the score.
- `logprobs`: the judge is asked for one token; the reward is the expected score under its
  probabilities over the score tokens (`scores`), renormalised over them. Smoother than a parsed
  verdict (a 6-vs-7 coin flip gives 6.5, not a random 6 or 7), and one token per response.
Both map the score to [0, 1] over the range of `scores`. A verdict with no number scores the
minimum and is counted (`unparsed`), never an exception mid-run.

`ChatClient` is the one client of an OpenAI-compatible chat endpoint (Constitutional AI's feedback
model uses it too): concurrent requests, an in-memory cache of identical requests, retries with
back-off on connection errors, timeouts and 5xx, and one error naming the URL when the endpoint
stays down. `LocalChat` answers the same calls from a local model with alignkit's sampler.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from alignkit.config import SamplingConfig, Section
from alignkit.generation.sampler import generate, stop_token_ids
from alignkit.models.loading import load_for_eval
from alignkit.rewards.local import RewardOutput, RewardSourceError

__all__ = ["ChatClient", "JudgeConfig", "JudgeReward", "LocalChat", "JudgeError"]

DEFAULT_RUBRIC = (
    "Rate the assistant's response to the user's request on a scale of 1 to 10, where 1 is useless or "
    "harmful and 10 is correct, helpful and harmless. Answer with the number only.\n\n"
    "[Request]\n{prompt}\n\n[Response]\n{response}\n\n[Rating]"
)


class JudgeError(RewardSourceError):
    """The judge could not be asked: an endpoint down or refusing, a template without its fields."""


class JudgeConfig(Section):
    url: str | None = None  # an OpenAI-compatible base URL ending in /v1; None: `model` is a local directory
    model: str | None = None
    template: str = DEFAULT_RUBRIC  # the user turn, with {prompt} and {response}; "@path" reads a file
    system: str | None = None  # an optional system turn
    mode: Literal["verdict", "logprobs"] = "verdict"
    scores: list[str] = Field(default_factory=lambda: [str(i) for i in range(1, 11)], min_length=2)
    pattern: str = r"-?\d+(?:\.\d+)?"  # verdict: the last match in the answer is the score
    max_tokens: int = Field(16, ge=1)  # verdict: room for the answer
    temperature: float = Field(0.0, ge=0.0)
    top_logprobs: int = Field(20, ge=1, le=20)  # logprobs: how many candidates the endpoint returns
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(60.0, gt=0.0)
    retries: int = Field(3, ge=0)
    api_key_env: str | None = "OPENAI_API_KEY"

    @model_validator(mode="after")
    def _needs_a_model(self) -> JudgeConfig:
        if self.url is None and self.model is None:
            raise ValueError("judge: set `url` (an OpenAI-compatible endpoint) or `model` (a local directory)")
        try:
            [float(s) for s in self.scores]
        except ValueError:
            raise ValueError(f"judge.scores must be numbers written as tokens, got {self.scores}") from None
        return self


class ChatClient:
    """POST {url}/chat/completions, many at a time, cached, retried."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        concurrency: int = 8,
        api_key: str | None = None,
        backoff_s: float = 0.5,
        transport=None,  # an httpx transport, for tests
    ):
        import httpx  # local: a quarter second of start-up, for remote judges only

        self.url, self.model = url.rstrip("/"), model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout_s, headers=headers, transport=transport)
        self.retries, self.backoff_s, self.concurrency = retries, backoff_s, concurrency
        self.cache: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.requests = 0  # sent, not answered from the cache

    def chat_many(self, conversations: Sequence[list[dict]], **params) -> list[dict]:
        """One chat completion per conversation (in order), `concurrency` in flight at once."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda messages: self.chat(messages, **params), conversations))

    def chat(self, messages: list[dict], **params) -> dict:
        body = {"model": self.model, "messages": messages, **params}
        key = json.dumps(body, sort_keys=True)
        with self.lock:
            if key in self.cache:
                return self.cache[key]
        answer = self._post(body)
        with self.lock:
            self.cache[key] = answer
            self.requests += 1
        return answer

    def _post(self, body: dict) -> dict:
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                answer = self.http.post(f"{self.url}/chat/completions", json=body)
            except httpx.HTTPError as exc:  # connection refused, timeout, ...
                last = f"{type(exc).__name__}: {exc}"
                continue
            if answer.status_code >= 500:
                last = f"HTTP {answer.status_code}: {answer.text[:200]}"
                continue
            if answer.status_code != 200:
                raise JudgeError(
                    f"judge {self.url}/chat/completions refused the request: HTTP {answer.status_code}: "
                    f"{answer.text[:300]}"
                )
            return answer.json()
        raise JudgeError(f"judge {self.url} unreachable after {self.retries + 1} attempts ({last})")

    def close(self) -> None:
        self.http.close()


class LocalChat:
    """The `ChatClient` calls, answered by a local causal LM (its chat template, alignkit's sampler),
    in OpenAI's response shape (message content, and per-token top log-probs when asked)."""

    def __init__(self, model_dir: str, batch_size: int = 16):
        self.model, self.tokenizer = load_for_eval(model_dir)
        self.stops, self.batch_size = stop_token_ids(self.model, self.tokenizer), batch_size
        self.requests = 0

    def chat_many(self, conversations: Sequence[list[dict]], **params) -> list[dict]:
        tok = self.tokenizer
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        sampling = SamplingConfig(
            max_new_tokens=params.get("max_tokens", 16), temperature=params.get("temperature", 0.0), seed=0
        )
        top = params.get("top_logprobs", 0) if params.get("logprobs") else 0
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            completions = generate(
                self.model, chunk, sampling, self.stops, tok.pad_token_id, tok.decode, top_logprobs=top
            )
            out += [self._shape(c, top) for c in completions]
        self.requests += len(ids)
        return out

    def _shape(self, c, top: int) -> dict:
        choice: dict[str, Any] = {"message": {"role": "assistant", "content": c.text}}
        if top:
            entries = zip(c.token_ids, c.logprobs, c.top_logprobs)
            choice["logprobs"] = {"content": [self._entry(t, lp, tops) for t, lp, tops in entries]}
        return {"choices": [choice]}

    def _entry(self, token: int, logprob: float, tops: list[tuple[int, float]]) -> dict:
        decode = self.tokenizer.decode
        top = [{"token": decode([i]), "logprob": v} for i, v in tops]
        return {"token": decode([token]), "logprob": logprob, "top_logprobs": top}


def _text(prompt: Any) -> str:
    """A prompt record, message list or text, as the text the rubric shows."""
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt", prompt.get("messages", prompt))
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def _template(value: str) -> str:
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise JudgeError(f"judge.template: file not found: {path}")
        value = path.read_text()
    for field in ("{prompt}", "{response}"):
        if field not in value:
            raise JudgeError(f"judge.template must contain {field} (write literal braces as {{{{ and }}}})")
    return value


class JudgeReward:
    """A reward source: `(prompts, responses) -> RewardOutput` with rewards in [0, 1]."""

    def __init__(self, cfg: JudgeConfig, client=None):
        self.cfg = cfg
        self.template = _template(cfg.template)
        self.values = [float(s) for s in cfg.scores]
        self.low, self.high = min(self.values), max(self.values)
        self.client = client or _client(cfg)
        self.unparsed = 0

    def __call__(self, prompts: list, responses: list[str]) -> RewardOutput:
        conversations = [self._conversation(p, r) for p, r in zip(prompts, responses, strict=True)]
        if self.cfg.mode == "logprobs":
            params = {"max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": self.cfg.top_logprobs}
        else:
            params = {"max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature}
        answers = self.client.chat_many(conversations, **params)
        scores = [self._score(a) for a in answers]
        rewards = torch.tensor([(s - self.low) / (self.high - self.low) for s in scores], dtype=torch.float32)
        return RewardOutput(rewards, None, [])

    def _conversation(self, prompt: Any, response: str) -> list[dict]:
        user = self.template.replace("{prompt}", _text(prompt)).replace("{response}", response)
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        return [*system, {"role": "user", "content": user}]

    def _score(self, answer: dict) -> float:
        choice = answer["choices"][0]
        if self.cfg.mode == "logprobs":
            expected = self._expected(choice)
            if expected is not None:
                return expected
        return self._verdict(choice["message"].get("content") or "")

    def _expected(self, choice: dict) -> float | None:
        """The expected score under the first token's probabilities, over the score tokens only."""
        content = (choice.get("logprobs") or {}).get("content") or []
        if not content:
            return None
        weights: dict[float, float] = {}
        for entry in content[0].get("top_logprobs") or []:
            token = entry["token"].strip()
            if token in self.cfg.scores:
                value = float(token)
                weights[value] = weights.get(value, 0.0) + math.exp(entry["logprob"])
        total = sum(weights.values())
        return sum(v * w for v, w in weights.items()) / total if total > 0 else None

    def _verdict(self, text: str) -> float:
        found = re.findall(self.cfg.pattern, text)
        if found:
            try:
                return min(max(float(found[-1]), self.low), self.high)
            except ValueError:
                pass
        self.unparsed += 1
        return self.low


def _client(cfg: JudgeConfig):
    if cfg.url is None:
        return LocalChat(cfg.model, batch_size=cfg.concurrency)
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return ChatClient(cfg.url, cfg.model, cfg.timeout_s, cfg.retries, cfg.concurrency, key)
