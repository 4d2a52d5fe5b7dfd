"""The one sampling loop over a prompt set: `sampling.batch_size` prompts per `engine.generate` call
(`generation/engine.py`: the native sampler or vLLM), each batch seeded by its caller's scheme. RL
rollouts, rejection sampling, SteerLM 2.0, on-policy DPO pairs, Constitutional AI's answers,
evaluation and `alignkit generate` all sample through it, so a change of backend, stop tokens or
seeding reaches every path at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from alignkit.config import SamplingConfig
from alignkit.data.io import DataError
from alignkit.generation.engine import Engine
from alignkit.generation.sampler import Completion
from alignkit.models.loading import position_limit, unwrap

__all__ = ["check_prompt_lengths", "sample_batches"]


def check_prompt_lengths(model, prompt_ids: list[list[int]], max_new_tokens: int, names: list[str]) -> None:
    """Every prompt plus `max_new_tokens` within the model's position limit, else a DataError naming
    the prompt (`names[i]`, e.g. a record's file:line): beyond it, an embedding IndexError mid-batch."""
    limit = position_limit(unwrap(model).config)
    if limit is None:
        return
    for ids, name in zip(prompt_ids, names):
        if len(ids) + max_new_tokens > limit:
            raise DataError(
                f"{name}: the prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"model's position limit of {limit}"
            )


def sample_batches(
    engine: Engine,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    seed_of: Callable[[int], int | None],
) -> Iterator[tuple[int, list[Completion]]]:
    """`sampling.n` samples of each prompt, `sampling.batch_size` prompts per `engine.generate`
    call. The batch whose first prompt is `prompt_ids[start]` samples with seed `seed_of(start)`:
    the recipe's scheme fixes which samples a resumed run or another number of processes sees.
    Yields (start, the batch's completions: sample j of its prompt i at i * n + j)."""
    for start in range(0, len(prompt_ids), sampling.batch_size):
        params = sampling.model_copy(update={"seed": seed_of(start)})
        yield start, engine.generate(prompt_ids[start : start + sampling.batch_size], params)
