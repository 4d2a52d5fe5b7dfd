"""The native backend: alignkit's batched KV-cache sampler (`sampler.generate`) run on the policy
module itself, so there are no weights to push after an update."""

from __future__ import annotations

import contextlib

from torch import nn

from alignkit.config import SamplingConfig
from alignkit.generation.sampler import Completion, TokenCallback, generate, stop_token_ids
from alignkit.models.loading import gathered, unwrap

__all__ = ["NativeEngine"]


class NativeEngine:
    def __init__(self, model: nn.Module, tokenizer, autocast=contextlib.nullcontext):
        self.module = unwrap(model)  # generation skips the DDP wrapper (no gradients, no collectives)
        self.tokenizer = tokenizer
        self.autocast = autocast
        self.stops = stop_token_ids(self.module, tokenizer)

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingConfig,
        top_logprobs: int = 0,
        on_token: TokenCallback | None = None,
    ) -> list[Completion]:
        """`sampler.generate` under the engine's autocast; the module's train/eval mode is restored."""
        was_training = self.module.training
        with gathered(self.module), self.autocast():  # FSDP: a whole model, no collectives per token
            completions = generate(
                self.module,
                prompts,
                params,
                self.stops,
                self.tokenizer.pad_token_id,
                self.tokenizer.decode,
                top_logprobs=top_logprobs,
                on_token=on_token,
            )
        self.module.train(was_training)
        return completions

    def update_weights(self, model: nn.Module) -> None:
        self.module = unwrap(model)
