"""One interface for every generation backend: an `Engine` samples completions of tokenized prompts
(`generate`) and takes the policy's current weights (`update_weights`). `build_engine` picks the
backend named by `sampling.backend`:

    native   alignkit's KV-cache sampler on the policy module itself (`generation/native.py`);
             `update_weights` has nothing to do, the engine IS the policy
    vllm     an in-process vLLM engine (`generation/vllm.py`), built once from the policy's config
             and tokenizer, whose weights are replaced in memory after each update

Both return `sampler.Completion`s with the same conventions: sample j of prompt i at i * n + j,
`logprobs` the sampled tokens' log-probs under the raw distribution (temperature 1, no top-k/top-p),
`is_end`/`finish_reason` "eos" | "stop" | "length", text cut before a stop string.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from torch import nn

from alignkit.config import ConfigError, SamplingConfig
from alignkit.generation.sampler import Completion, TokenCallback

__all__ = ["Engine", "build_engine"]


class Engine(Protocol):
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingConfig,
        top_logprobs: int = 0,
        on_token: TokenCallback | None = None,
    ) -> list[Completion]:
        """`params.n` completions of each prompt, seeded by `params.seed`; each step's `top_logprobs`
        most likely tokens kept when asked; `on_token(row, token, logprob, top)` called per sampled
        token (the native engine as it samples, vLLM's once its batch is done)."""
        ...

    def update_weights(self, model: nn.Module) -> None:
        """Sample from `model`'s current weights from now on (LoRA adapters merged)."""
        ...


def build_engine(model: nn.Module, tokenizer, sampling: SamplingConfig, autocast=contextlib.nullcontext) -> Engine:
    """The engine `sampling.backend` names, sampling from `model` (DDP-wrapped or not, LoRA or not);
    `autocast` is the precision context of the native sampler's forward passes."""
    if sampling.backend == "vllm":
        from alignkit.generation.vllm import VLLMEngine  # local: vLLM is an optional extra

        if sampling.vllm.tensor_parallel_size > 1:
            raise ConfigError(
                f"sampling.vllm.tensor_parallel_size={sampling.vllm.tensor_parallel_size} splits an engine over "
                "generation ranks of its own: set placement.generator.ranks to a multiple of it and run with "
                "--launcher ray (an engine inside the trainer's processes is whole: tensor_parallel_size 1)"
            )

        return VLLMEngine(model, tokenizer, sampling.vllm)
    from alignkit.generation.native import NativeEngine

    return NativeEngine(model, tokenizer, autocast)
