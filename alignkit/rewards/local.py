"""A reward model from a local directory (what the `reward_model` recipe saves) as a reward source.

    rm = LocalRewardModel("runs/demo/reward_model/final")
    out = rm.score(["What is 2 + 2?"], ["2 + 2 = 4."])   # out.rewards (N,), out.attributes (N, A)

Prompts and responses are strings (one user message, one assistant message) or message lists;
they are rendered with the model's own chat template, exactly as in training. `rewards` is the
scalar w . a of the head's outputs, standardised with the model's recorded mean and std when
`normalize` is on; `attributes` are the raw head outputs, named by `names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignkit.data.formats import Message, messages_from_value
from alignkit.data.reward import encode_scored
from alignkit.models.loading import autocast, check_model_dir, position_limit
from alignkit.models.reward import RewardModelInfo, score_sequences

__all__ = ["LocalRewardModel", "RewardOutput", "RewardSourceError"]


class RewardSourceError(RuntimeError):
    """A reward source could not score: an unreachable server, a bad function, a malformed answer."""


@dataclass
class RewardOutput:
    rewards: torch.Tensor  # (N,) float32
    attributes: torch.Tensor | None  # (N, A) float32 (a model: its raw head outputs), or None
    names: list[str]  # the A attribute names


class LocalRewardModel:
    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        batch_size: int = 16,
        normalize: bool = False,
        max_seq_len: int | None = None,
    ):
        path = Path(path)
        check_model_dir(path)  # a missing or damaged weights file is one line, not a safetensors traceback
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch.bfloat16 if precision == "bf16" else torch.float32
            )
            .to(self.device)
            .eval()
        )
        self.info = RewardModelInfo.from_config(self.model.config)
        self.precision, self.batch_size, self.normalize = precision, batch_size, normalize
        # never beyond the model's positions: a longer text is cut and scored at its last kept token
        limits = [x for x in (max_seq_len, position_limit(self.model.config)) if x is not None]
        self.max_seq_len = min(limits) if limits else None

    @property
    def names(self) -> list[str]:
        return self.info.attributes

    def encode(self, prompt: str | list[Message], response: str | list[Message]) -> list[int]:
        messages = [
            *messages_from_value(prompt, "user", "prompt"),
            *messages_from_value(response, "assistant", "response"),
        ]
        ids = encode_scored(self.tokenizer, messages, None, "score").input_ids
        if self.max_seq_len is not None and len(ids) > self.max_seq_len:
            ids = ids[: self.max_seq_len]  # scored at the last kept token
        return ids

    def score(self, prompts: list, responses: list) -> RewardOutput:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        sequences = [self.encode(p, r) for p, r in zip(prompts, responses)]
        attributes = score_sequences(
            self.model,
            sequences,
            self.tokenizer.pad_token_id,
            self.batch_size,
            self.device,
            lambda: autocast(self.precision, self.device),
        )
        if not sequences:
            attributes = torch.zeros(0, len(self.names))
        return RewardOutput(self.info.reward(attributes, self.normalize), attributes, self.names)
