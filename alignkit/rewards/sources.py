"""Reward sources behind one call: `source(prompts, responses) -> RewardOutput`.

    prompts    list of prompt strings (one user message), message lists, or task-world prompt
               records (dicts with "prompt"); responses: list of strings
    returns    RewardOutput(rewards (N,), attributes (N, A) or None, names)

Kinds (`RewardSourceConfig.kind`):
  model     a local reward model directory (`alignkit.rewards.LocalRewardModel`)
  http      a remote reward server (`alignkit serve reward`), with timeouts and retries
  function  a Python function named `package.module:function`, called as fn(prompts, responses) and
            returning a list of floats, or a dict {"rewards": [...], "attributes": [[...]], "names": [...]}
  oracle    the task world's oracle judge (its scalar reward and seven 0-4 attributes)
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from alignkit.config import Section
from alignkit.rewards.http import post_json
from alignkit.rewards.judge import JudgeConfig, JudgeReward
from alignkit.rewards.local import LocalRewardModel, RewardOutput, RewardSourceError
from alignkit.tasks.oracle import ATTRIBUTES, score_response

__all__ = [
    "FunctionReward",
    "OracleReward",
    "RemoteRewardModel",
    "RewardSourceConfig",
    "RewardSourceError",
    "build_reward_source",
]


class RewardSourceConfig(Section):
    kind: Literal["model", "http", "function", "oracle", "judge"]
    path: str | None = None  # model: the reward model directory
    url: str | None = None  # http: the server's base URL, e.g. http://127.0.0.1:5555
    function: str | None = None  # function: "package.module:function"
    normalize: bool = False  # model: standardise with the model's recorded mean and std
    batch_size: int = Field(16, ge=1)  # model: sequences per forward
    timeout_s: float = Field(60.0, gt=0.0)  # http: per request
    retries: int = Field(3, ge=0)  # http: attempts after the first on a connection error, timeout or 5xx
    token_env: str | None = "ALIGNKIT_REWARD_TOKEN"  # http: bearer token read from this variable, if set
    judge: JudgeConfig | None = None  # judge: an LLM grading against a rubric (alignkit.rewards.judge)

    @model_validator(mode="after")
    def _needs(self) -> RewardSourceConfig:
        needed = {"model": "path", "http": "url", "function": "function", "judge": "judge"}.get(self.kind)
        if needed and getattr(self, needed) is None:
            raise ValueError(f"reward source kind={self.kind} needs `{needed}`")
        return self


def _prompt_text(prompt: Any) -> Any:
    return prompt["prompt"] if isinstance(prompt, dict) and "prompt" in prompt else prompt


def _as_output(value: Any, n: int, where: str) -> RewardOutput:
    """A function's or server's answer -> RewardOutput, checked."""
    if isinstance(value, dict):
        rewards, attributes, names = value.get("rewards"), value.get("attributes"), value.get("names") or []
    else:
        rewards, attributes, names = value, None, []
    try:
        rewards_t = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
        attributes_t = torch.as_tensor(attributes, dtype=torch.float32) if attributes is not None else None
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RewardSourceError(f"{where}: rewards must be numbers ({exc})") from None
    if rewards_t.numel() != n:
        raise RewardSourceError(f"{where}: returned {rewards_t.numel()} rewards for {n} responses")
    if attributes_t is not None and (attributes_t.dim() != 2 or attributes_t.shape[0] != n):
        raise RewardSourceError(f"{where}: attributes must be a list of {n} lists")
    return RewardOutput(rewards_t, attributes_t, list(names))


class FunctionReward:
    """`package.module:function` as a reward source. The module is looked up as `python -m`
    would: installed packages, then the working directory (the `alignkit` console script does
    not put the working directory on the path by itself)."""

    def __init__(self, spec: str):
        module_name, _, name = spec.partition(":")
        if not module_name or not name:
            raise RewardSourceError(f"reward function {spec!r}: expected 'package.module:function'")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - not found, or the user's module failed while importing
            raise RewardSourceError(f"reward function {spec!r}: {_import_failure(exc, module_name)}") from None
        self.fn: Callable = getattr(module, name, None)
        if not callable(self.fn):
            raise RewardSourceError(f"reward function {spec!r}: {module_name} has no function {name!r}")
        self.spec = spec

    def __call__(self, prompts: list, responses: list[str]) -> RewardOutput:
        return _as_output(self.fn(prompts, responses), len(responses), f"reward function {self.spec}")


def _import_failure(exc: Exception, module_name: str) -> str:
    """Why `module_name` did not import: not found at all, or failed inside (say where)."""
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if missing is not None and (module_name == missing or module_name.startswith(missing + ".")):
        return f"no module named {missing!r} (looked in the installed packages and the working directory {os.getcwd()})"
    return f"importing {module_name} failed: {_one_line(exc)}"


def _one_line(exc: BaseException) -> str:
    """`Type: message (file, line N)` for an exception raised in a user's module."""
    where = ""
    if isinstance(exc, SyntaxError):
        where = f" ({exc.filename}, line {exc.lineno})"
    elif exc.__traceback__ is not None:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" ({frame.filename}, line {frame.lineno})"
    return f"{type(exc).__name__}: {exc}{where}".replace("\n", " ")


class OracleReward:
    """The task world's oracle: the scalar reward and the seven attributes of each response."""

    def __call__(self, prompts: list, responses: list[str]) -> RewardOutput:
        scores = [score_response(p, r) for p, r in zip(prompts, responses, strict=True)]
        return RewardOutput(
            torch.tensor([s.reward for s in scores], dtype=torch.float32),
            torch.tensor([[getattr(s, a) for a in ATTRIBUTES] for s in scores], dtype=torch.float32),
            list(ATTRIBUTES),
        )


class RemoteRewardModel:
    """A client of `alignkit serve reward`: POST {url}/score, retried on connection errors,
    timeouts and 5xx answers with exponential back-off; 4xx answers are not retried."""

    def __init__(
        self, url: str, timeout_s: float = 60.0, retries: int = 3, token: str | None = None, backoff_s: float = 0.5
    ):
        import httpx  # local, here and below: a quarter second of start-up, for remote rewards only

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.retries, self.backoff_s = retries, backoff_s

    def __call__(self, prompts: list, responses: list[str]) -> RewardOutput:
        payload = {"prompts": [_prompt_text(p) for p in prompts], "responses": list(responses)}
        answer = post_json(self.client, "reward server", self.url, "score", payload, self.retries, self.backoff_s)
        return _as_output(answer, len(responses), f"reward server {self.url}")

    def close(self) -> None:
        self.client.close()


def build_reward_source(cfg: RewardSourceConfig, device: str = "cpu"):
    """The configured source, as a callable `(prompts, responses) -> RewardOutput`."""
    if cfg.kind == "model":
        model = LocalRewardModel(cfg.path, device=device, batch_size=cfg.batch_size, normalize=cfg.normalize)
        return lambda prompts, responses: model.score([_prompt_text(p) for p in prompts], responses)
    if cfg.kind == "http":
        token = os.environ.get(cfg.token_env) if cfg.token_env else None
        return RemoteRewardModel(cfg.url, cfg.timeout_s, cfg.retries, token)
    if cfg.kind == "function":
        return FunctionReward(cfg.function)
    if cfg.kind == "judge":
        return JudgeReward(cfg.judge)
    return OracleReward()
