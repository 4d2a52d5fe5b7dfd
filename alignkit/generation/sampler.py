"""Batched sampling with a KV cache: greedy, temperature, top-k, top-p, stop strings.

`generate` takes tokenized prompts of different lengths, left-pads them into one batch,
runs the prompt once, then decodes one token per step from the cache. Rows that finish
(EOS or a stop string) are dropped from the batch and the cache, so the cost of a step
follows the number of rows still running.

Log-probabilities: `Completion.logprobs[t]` is log p(token_t | prefix) under the model's own
distribution (temperature 1, no top-k/top-p truncation), the quantity a training forward
pass computes, so RL recipes can use them as the old policy's log-probs. (Peers differ:
some report the truncated sampling distribution's log-probs, biased by log of the kept mass.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from alignkit.config import SamplingConfig

__all__ = ["Completion", "TokenCallback", "generate", "stop_cut", "stop_token_ids"]


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    is_end: bool  # ended by EOS or a stop string, not by max_new_tokens
    finish_reason: str = field(default="length")  # "eos" | "stop" | "length"
    # per token, the `top_logprobs` most likely (id, log-prob) pairs; empty unless asked for
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


# on_token(row, token_id, logprob, top): called as each token is sampled, for streaming
TokenCallback = Callable[[int, int, float, list[tuple[int, float]]], None]


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and each `eos_token_id` of the model's
    generation config and config. Instruct models end a turn with a token of their own, listed
    there beside EOS (Llama-3's <|eot_id|>, Gemma's <end_of_turn>, Qwen's <|im_end|>): stopping at
    the tokenizer's EOS alone runs past the answer to max_new_tokens."""
    base = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # peft
    sources = (
        tokenizer.eos_token_id,
        getattr(getattr(base, "generation_config", None), "eos_token_id", None),
        getattr(base.config, "eos_token_id", None),
    )
    ids: list[int] = []
    for source in sources:
        for token in [source] if isinstance(source, int) else list(source or []):
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids


def _filter_logits(logits: torch.Tensor, params: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p on (B, V) logits."""
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of (R, V) probabilities by inverse CDF: one uniform u per row, the first
    token whose cumulative probability exceeds u x total (`torch.multinomial` draws an exponential
    per vocabulary entry). `right=True` never lands on a zero-probability token (top-k and top-p
    cuts); where rounding puts u x total at the total, the last token with probability is taken."""
    cdf = probs.cumsum(-1)  # (R, V)
    total = cdf[:, -1:].contiguous()  # (R, 1)
    u = torch.rand(total.shape, generator=generator, dtype=cdf.dtype, device=cdf.device)  # (R, 1)
    tokens = torch.searchsorted(cdf, u * total, right=True)  # (R, 1)
    return torch.minimum(tokens, torch.searchsorted(cdf, total)).squeeze(-1)  # (R,)


def _top(logps: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The k most likely (id, log-prob) pairs of each row of (R, V) log-probs; [] when k is 0."""
    if k <= 0:
        return []
    values, ids = torch.topk(logps, min(k, logps.shape[-1]), dim=-1)
    return [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]


def stop_cut(text: str, stops: tuple[str, ...]) -> int | None:
    """Where `text` is cut: the start of its first stop string, or None."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def _forward_parameters(model: nn.Module) -> set[str]:
    """The argument names of the model's forward. A peft wrapper forwards **kwargs, so the
    wrapped model's signature decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(type(base).forward).parameters)


def _cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache argument of the model's forward: `cache` from transformers 5.24 on
    (where `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _step_kwargs(model: nn.Module, cache) -> dict:
    """Keyword arguments of every decoding forward: the KV cache, and `logits_to_keep=1` where the
    model takes it, so the prompt pass computes the LM head for the last position only instead of
    all B x P (a (B, P, V) fp32 tensor of which the sampler reads one column)."""
    kwargs = {_cache_argument(model): cache}
    if "logits_to_keep" in _forward_parameters(model):
        kwargs["logits_to_keep"] = 1
    return kwargs


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    params: SamplingConfig,
    eos_token_id: int | list[int],
    pad_token_id: int,
    decode=None,
    top_logprobs: int = 0,
    on_token: TokenCallback | None = None,
) -> list[Completion]:
    """Sample `params.n` completions for each tokenized prompt.

    Args:
        model: a Hugging Face causal LM (eval mode is set here).
        prompts: token ids per prompt (any lengths).
        eos_token_id: id(s) that end a completion (kept in token_ids, not in text).
        decode: `list[int] -> str` (e.g. `tokenizer.decode`), needed for text and stop strings.
        top_logprobs: also keep the k most likely tokens of every step and their log-probs.
        on_token: called with (row, token, logprob, top) as each token is sampled (row = i * n + j).

    Returns:
        completions ordered by prompt, then sample: index i * n + j is sample j of prompt i.
    """
    model.eval()
    device = next(model.parameters()).device
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    rows = [p for p in prompts for _ in range(params.n)]
    width = max(len(p) for p in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for i, p in enumerate(rows):  # left padding: every row's next token lands in the same column
        input_ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    cache = DynamicCache()
    step_kwargs = _step_kwargs(model, cache)
    alive = torch.arange(batch, device=device)  # original row of each running row
    tokens: list[list[int]] = [[] for _ in range(batch)]
    logps: list[list[float]] = [[] for _ in range(batch)]
    tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    texts: list[str | None] = [None] * batch
    step_ids, step_positions = input_ids, positions
    for _ in range(params.max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, use_cache=True, **step_kwargs)
        logits = out.logits[:, -1, :].float()  # (R, V)
        if params.temperature == 0:
            next_tokens = logits.argmax(-1)
        else:
            next_tokens = _sample(_filter_logits(logits, params).softmax(-1), generator)
        all_logps = logits.log_softmax(-1)  # (R, V)
        token_logps = all_logps.gather(-1, next_tokens[:, None]).squeeze(-1)
        step_tops = _top(all_logps, top_logprobs)
        finished = torch.isin(next_tokens, eos).tolist()  # a list: indexing a tensor per row is slow
        for r, (row, tok, lp) in enumerate(zip(alive.tolist(), next_tokens.tolist(), token_logps.tolist())):
            tokens[row].append(tok)
            logps[row].append(lp)
            if top_logprobs:
                tops[row].append(step_tops[r])
            if on_token is not None:
                on_token(row, tok, lp, step_tops[r] if top_logprobs else [])
            if finished[r]:
                reasons[row] = "eos"
            elif params.stop and decode is not None:
                text = decode(tokens[row])
                cut = stop_cut(text, params.stop)
                if cut is not None:
                    reasons[row], texts[row] = "stop", text[:cut]
                    finished[r] = True
        if all(finished):
            break
        if any(finished):  # shrink the batch and its cache to the running rows
            keep = torch.tensor([r for r, done in enumerate(finished) if not done], device=device)
            cache.batch_select_indices(keep)
            alive, next_tokens, mask = alive[keep], next_tokens[keep], mask[keep]
            step_positions = step_positions[keep]
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
        step_ids = next_tokens[:, None]
        step_positions = step_positions[:, -1:] + 1

    completions = []
    for row in range(batch):
        ids = tokens[row]
        text = texts[row]
        if text is None and decode is not None:
            text = decode(ids[:-1] if reasons[row] == "eos" else ids)
        completions.append(
            Completion(
                prompt_index=row // params.n,
                token_ids=ids,
                logprobs=logps[row],
                text=text or "",
                is_end=reasons[row] != "length",
                finish_reason=reasons[row],
                top_logprobs=tops[row],
            )
        )
    return completions
