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

Both take an optional `cache_path`: a JSONL file with one `{"key", "answer"}` line per answer,
appended (and flushed) as each answer arrives and read back at start. A killed labelling run
started again with the same file asks only what it had not been answered: every request answered
before the kill is served from the file, only those in flight at the kill are sent again. The key
is the whole request (model, messages, sampling), so a changed prompt or setting is a new request.
A line cut short by the kill is skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from alignkit.config import SamplingConfig, Section
from alignkit.generation.sampler import generate, stop_token_ids
from alignkit.models.loading import load_for_eval
from alignkit.rewards.http import post_json
from alignkit.rewards.local import RewardOutput, RewardSourceError

__all__ = [
    "ChatClient",
    "DiskCache",
    "JudgeConfig",
    "JudgeReward",
    "LocalChat",
    "JudgeError",
    "chat_client",
    "teacher_scores",
]

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
    cache_path: str | None = None  # a JSONL file of answers, appended as they arrive and reused

    @model_validator(mode="after")
    def _needs_a_model(self) -> JudgeConfig:
        if self.url is None and self.model is None:
            raise ValueError("judge: set `url` (an OpenAI-compatible endpoint) or `model` (a local directory)")
        try:
            [float(s) for s in self.scores]
        except ValueError:
            raise ValueError(f"judge.scores must be numbers written as tokens, got {self.scores}") from None
        return self


class DiskCache:
    """Answers by request key, in memory and (with a path) in an append-only JSONL file."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.answers: dict[str, dict] = {}
        self.lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.answers[entry["key"]] = entry["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # the last line of a killed run may be cut short
        self.loaded = len(self.answers)

    def get(self, key: str) -> dict | None:
        with self.lock:
            return self.answers.get(key)

    def put(self, key: str, answer: dict) -> None:
        with self.lock:
            if key in self.answers:
                return
            self.answers[key] = answer
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:  # one whole line per answer
                    f.write(json.dumps({"key": key, "answer": answer}) + "\n")
                    f.flush()


def request_key(body: dict) -> str:
    return json.dumps(body, sort_keys=True)


class ChatClient:
    """POST {url}/chat/completions, many at a time, cached (in memory, and on disk with
    `cache_path`), retried."""

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
        cache_path: str | Path | None = None,
        who: str = "judge",  # how errors name the endpoint's role
    ):
        import httpx  # local: a quarter second of start-up, for remote judges only

        self.url, self.model = url.rstrip("/"), model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout_s, headers=headers, transport=transport)
        self.retries, self.backoff_s, self.concurrency = retries, backoff_s, concurrency
        self.cache = DiskCache(cache_path)
        self.lock = threading.Lock()
        self.requests = 0  # sent, not answered from the cache
        self.who = who

    def chat_many(self, conversations: Sequence[list[dict]], **params) -> list[dict]:
        """One chat completion per conversation (in order), `concurrency` in flight at once."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda messages: self.chat(messages, **params), conversations))

    def chat(self, messages: list[dict], **params) -> dict:
        body = {"model": self.model, "messages": messages, **params}
        key = request_key(body)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        answer = self._post(body)
        with self.lock:
            self.requests += 1
        self.cache.put(key, answer)
        return answer

    def prompt_logprobs(self, sequences: Sequence[list[int]], top_k: int, per_request: int = 16) -> list[list]:
        """vLLM's `prompt_logprobs` of each token-id sequence (one `null`, then one {id: {"logprob",
        "rank", ...}} per later token), `per_request` sequences per POST to {url}/completions and
        `concurrency` POSTs in flight. Not cached: a teacher scores each rollout once."""
        chunks = [list(sequences[i : i + per_request]) for i in range(0, len(sequences), per_request)]

        def score(chunk: list[list[int]]) -> list[list]:
            body = {"model": self.model, "prompt": chunk, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k}
            choices = self._post(body, "completions").get("choices") or []
            if len(choices) != len(chunk) or any(c.get("prompt_logprobs") is None for c in choices):
                raise JudgeError(
                    f"{self.url}/completions returned no prompt_logprobs: scoring given tokens needs a server "
                    "with vLLM's prompt_logprobs (vLLM, `alignkit serve generate`)"
                )
            return [c["prompt_logprobs"] for c in sorted(choices, key=lambda c: c.get("index", 0))]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return [entries for answer in pool.map(score, chunks) for entries in answer]

    def _post(self, body: dict, endpoint: str = "chat/completions") -> dict:
        url, retries = self.url, self.retries
        return post_json(self.http, self.who, url, endpoint, body, retries, self.backoff_s, JudgeError)

    def close(self) -> None:
        self.http.close()


def teacher_scores(
    client: ChatClient, pairs: Sequence[tuple[list[int], list[int]]], top_k: int, vocab: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A teacher behind an endpoint scores given (prompt ids, response ids) pairs: per response, its
    tokens' log-probs (R,) and the teacher's `top_k` most likely (ids, log-probs), each (R, K), at
    each response position. The endpoint must share the student's tokenizer: an id outside the
    student's `vocab`, or fewer than `top_k` candidates, is an error naming the URL."""
    answers = client.prompt_logprobs([prompt + response for prompt, response in pairs], top_k)
    out = []
    for (prompt, response), entries in zip(pairs, answers):
        positions = entries[len(prompt) : len(prompt) + len(response)]
        logps, ids, tops = [], [], []
        for token, entry in zip(response, positions):
            ranked = sorted(((int(i), float(v["logprob"])) for i, v in (entry or {}).items()), key=lambda e: -e[1])
            mine = dict(ranked).get(token)
            if mine is None or len(ranked) < top_k or max(i for i, _ in ranked) >= vocab:
                raise JudgeError(
                    f"teacher {client.url}: prompt_logprobs without token {token} or its top {top_k} "
                    f"(got {len(ranked)} entries); the teacher must share the student's tokenizer"
                )
            logps.append(mine)
            ids.append([i for i, _ in ranked[:top_k]])
            tops.append([v for _, v in ranked[:top_k]])
        shape = (len(response), top_k)
        out.append(
            (
                torch.tensor(logps),
                torch.tensor(ids, dtype=torch.long).reshape(shape),
                torch.tensor(tops).reshape(shape),
            )
        )
    return out


class LocalChat:
    """The `ChatClient` calls, answered by a local causal LM (its chat template, alignkit's sampler),
    in OpenAI's response shape (message content, and per-token top log-probs when asked)."""

    def __init__(self, model_dir: str | None, batch_size: int = 16, cache_path: str | Path | None = None, loaded=None):
        self.model_dir = str(model_dir)
        self.model, self.tokenizer = loaded or load_for_eval(model_dir)
        self.stops, self.batch_size = stop_token_ids(self.model, self.tokenizer), batch_size
        self.cache = DiskCache(cache_path)
        self.requests = 0  # generated, not answered from the cache

    @classmethod
    def from_model(cls, model, tokenizer, name: str, batch_size: int = 16, cache_path: str | Path | None = None):
        """A model already in memory (e.g. the policy critiquing its own answers, as in the paper's
        SL-CAI); `name` stands for it in the cache keys."""
        return cls(name, batch_size, cache_path, loaded=(model, tokenizer))

    def chat(self, messages: list[dict], **params) -> dict:
        return self.chat_many([messages], **params)[0]

    def chat_many(self, conversations: Sequence[list[dict]], **params) -> list[dict]:
        keys = [request_key({"model": self.model_dir, "messages": c, **params}) for c in conversations]
        out = [self.cache.get(k) for k in keys]
        missing = [i for i, answer in enumerate(out) if answer is None]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for i, answer in zip(chunk, self._generate([conversations[i] for i in chunk], **params)):
                self.cache.put(keys[i], answer)
                out[i] = answer
        return out  # type: ignore[return-value]

    def _generate(self, conversations: Sequence[list[dict]], **params) -> list[dict]:
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
        self.client = client or chat_client(cfg)
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


def chat_client(cfg: JudgeConfig):
    """The `ChatClient` of `cfg.url` (API key from the environment variable `cfg.api_key_env`), or a
    `LocalChat` of the local model directory `cfg.model` when there is no url."""
    if cfg.url is None:
        return LocalChat(cfg.model, batch_size=cfg.concurrency, cache_path=cfg.cache_path)
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return ChatClient(cfg.url, cfg.model, cfg.timeout_s, cfg.retries, cfg.concurrency, key, cache_path=cfg.cache_path)
