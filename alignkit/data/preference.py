"""Preference pairs end to end: records -> validated messages -> masked token ids -> one packed row per pair.

Accepted records (one JSON object each):
- `{"prompt", "chosen", "rejected"}` (TRL, Anthropic HH style). `prompt` is a string (one user
  message) or a list of messages (a multi-turn context, a system message, ...); `chosen` and
  `rejected` are strings or lists of assistant messages.
- NeMo-Aligner's `{"prompt", "chosen_response", "rejected_response"}`, same value types.
- Optional `chosen_reward` / `rejected_reward` (numbers): the ground truth of the `rpo_*` losses,
  which require them.

Each pair becomes two examples, prompt+chosen and prompt+rejected, whose targets cover the
response's assistant turns only (never an assistant turn inside the prompt). Both go into ONE
row (`collate_pairs`): position ids restart at each sequence, so one forward pass scores both
without padding between them and without either attending to the other. `seq_index` maps each
target position to its sequence (pair j: chosen 2j, rejected 2j+1), so per-sequence
log-probabilities are a segment sum over the targets (`alignkit.models.forward.sequence_logps`).

The over-length policy (`data.overlength`) applies to each sequence, and a pair is kept or
dropped as a whole: `truncate` cuts the end of a response (the prompt comes first and carries no
targets), and a pair whose prompt alone fills `max_seq_len` is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from alignkit.config import DataConfig, DatasetConfig
from alignkit.data.batching import collate_groups
from alignkit.data.formats import Message, messages_from_value, record_tools, with_system_prompt
from alignkit.data.io import DataError, Record, field_names, finite_number, read_records, shown
from alignkit.data.tokenize import EncodeStats, Example, encode_spans, fit_length, render_with_spans

__all__ = [
    "PreferencePair",
    "RESPONSE_KEYS",
    "collate_pairs",
    "encode_pair",
    "load_kto_pairs",
    "load_preference_pairs",
    "pair_length",
    "parse_preference",
]

# The two spellings of a pair's response fields: TRL's and NeMo-Aligner's.
RESPONSE_KEYS = (("chosen", "rejected"), ("chosen_response", "rejected_response"))


@dataclass
class PreferencePair:
    chosen: Example  # prompt + chosen response; targets on the response only
    rejected: Example  # prompt + rejected response
    source: str
    chosen_reward: float | None = None  # ground truth, if the record has one
    rejected_reward: float | None = None
    # Summed reference log-probs of each response, attached from the cache (cached mode).
    reference: tuple[float, float] | None = field(default=None, repr=False)
    # KTO: `chosen` is the example's own completion, `rejected` a MISMATCHED one (the next
    # record's completion after this prompt), and `label` says whether the completion is desirable.
    label: bool | None = None


@dataclass
class ParsedPreference:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    chosen_reward: float | None
    rejected_reward: float | None
    tools: list[dict] | None = None  # the record's tool schemas, for the chat template


def _response(value, where: str, key: str) -> list[Message]:
    messages = messages_from_value(value, "assistant", f"{where}: field '{key}'")
    if not messages:
        raise DataError(f"{where}: field '{key}' is an empty list")
    roles = {m["role"] for m in messages}
    if roles != {"assistant"}:
        raise DataError(
            f"{where}: field '{key}' must be a string or a list of assistant messages (found roles "
            f"{sorted(roles)}); put the conversation before the response into 'prompt'"
        )
    return messages


def _reward(data: dict, key: str, where: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    number = finite_number(value)
    if number is None:
        raise DataError(f"{where}: field '{key}' must be a finite number, got {shown(value)}")
    return number


def parse_preference(
    record: Record, system_prompt: str | None = None, require_rewards: bool = False
) -> ParsedPreference:
    """The record's prompt messages, chosen and rejected responses and optional rewards."""
    data, where = record.data, record.source
    keys = next((pair for pair in RESPONSE_KEYS if pair[0] in data or pair[1] in data), None)
    if "prompt" not in data or keys is None or not all(k in data for k in keys):
        missing = [k for k in ("prompt", *(keys or RESPONSE_KEYS[0])) if k not in data]
        raise DataError(
            f"{where}: missing field(s) {', '.join(repr(k) for k in missing)} (a preference record has "
            "prompt + chosen + rejected, or prompt + chosen_response + rejected_response; found fields: "
            f"{field_names(data)})"
        )
    prompt = messages_from_value(data["prompt"], "user", f"{where}: field 'prompt'")
    if not prompt:
        raise DataError(f"{where}: field 'prompt' is an empty list")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant message; the response must follow a user turn")
    prompt = with_system_prompt(prompt, system_prompt)
    chosen_reward, rejected_reward = _reward(data, "chosen_reward", where), _reward(data, "rejected_reward", where)
    if require_rewards and (chosen_reward is None or rejected_reward is None):
        absent = [k for k, v in (("chosen_reward", chosen_reward), ("rejected_reward", rejected_reward)) if v is None]
        raise DataError(
            f"{where}: missing {' and '.join(absent)}: the rpo_* losses regress on ground-truth rewards, "
            "so every record needs chosen_reward and rejected_reward"
        )
    return ParsedPreference(
        prompt,
        _response(data[keys[0]], where, keys[0]),
        _response(data[keys[1]], where, keys[1]),
        chosen_reward,
        rejected_reward,
        record_tools(record),
    )


def _encode_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[Message],
    response: list[Message],
    template: str | None,
    where: str,
    tools: list[dict] | None = None,
) -> Example:
    """prompt + response token ids; shifted targets on the response's assistant turns only."""
    text, spans = render_with_spans(tokenizer, [*prompt, *response], template, where, tools)
    spans = spans[sum(m["role"] == "assistant" for m in prompt) :]  # drop assistant turns of the prompt
    return encode_spans(tokenizer, text, spans, where)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, parsed: ParsedPreference, template: str | None, where: str
) -> PreferencePair:
    return PreferencePair(
        chosen=_encode_response(tokenizer, parsed.prompt, parsed.chosen, template, where, parsed.tools),
        rejected=_encode_response(tokenizer, parsed.prompt, parsed.rejected, template, where, parsed.tools),
        source=where,
        chosen_reward=parsed.chosen_reward,
        rejected_reward=parsed.rejected_reward,
    )


def _fit_pair(pair: PreferencePair, data: DataConfig, stats: EncodeStats) -> PreferencePair | None:
    """The over-length policy per sequence; the pair is kept (maybe truncated) or dropped whole."""
    scratch = EncodeStats()
    chosen = fit_length(pair.chosen, data.max_seq_len, data.overlength, scratch)
    rejected = fit_length(pair.rejected, data.max_seq_len, data.overlength, scratch)
    if chosen is None or rejected is None:
        stats.dropped[next(iter(scratch.dropped))] += 1
        return None
    stats.truncated += scratch.truncated > 0
    pair.chosen, pair.rejected = chosen, rejected
    return pair


def load_preference_pairs(
    dataset: DatasetConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase, require_rewards: bool = False
) -> tuple[list[PreferencePair], EncodeStats]:
    """Tokenized pairs after the over-length policy (stats count pairs)."""
    records = read_records(dataset.path, dataset.split, dataset.limit)
    stats = EncodeStats(total=len(records))
    pairs = []
    for record in records:
        parsed = parse_preference(record, data.system_prompt, require_rewards)
        pair = _fit_pair(encode_pair(tokenizer, parsed, data.chat_template, record.source), data, stats)
        if pair is not None:
            pairs.append(pair)
    stats.kept = len(pairs)
    return pairs, stats


def _kto_label(record: Record) -> bool:
    data, where = record.data, record.source
    if "label" in data:
        if not isinstance(data["label"], bool):
            raise DataError(f"{where}: field 'label' must be true (desirable) or false, got {shown(data['label'])}")
        return data["label"]
    if data.get("preference") in ("chosen", "rejected"):  # NeMo-Aligner
        return data["preference"] == "chosen"
    raise DataError(
        f"{where}: missing field 'label' (true/false; or NeMo-Aligner's 'preference': "
        f"'chosen'|'rejected'); found fields: {field_names(data)}"
    )


def load_kto_pairs(
    dataset: DatasetConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[PreferencePair], EncodeStats]:
    """KTO's unpaired examples as pairs [own completion | mismatched completion] with a label.

    Records: `{"prompt", "completion", "label": bool}` (TRL), or `{"prompt", "response",
    "preference": "chosen"|"rejected"}` (NeMo-Aligner). The mismatched completion of record i is
    record i+1's (the last wraps to the first): a completion the policy was not asked for, whose
    log-ratio estimates KL(pi_theta || pi_ref), KTO's reference point (Ethayarajh et al. 2024).
    TRL shifts completions within each batch instead; a fixed pairing keeps the cached reference
    log-probs valid across epochs.
    """
    records = read_records(dataset.path, dataset.split, dataset.limit)
    stats = EncodeStats(total=len(records))
    parsed = []
    for record in records:
        d, where = record.data, record.source
        key = "response" if "response" in d and "completion" not in d else "completion"
        missing = [k for k in ("prompt", key) if k not in d]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {', '.join(repr(k) for k in missing)} (a KTO record has "
                "prompt, completion and label)"
            )
        prompt = with_system_prompt(
            messages_from_value(d["prompt"], "user", f"{where}: field 'prompt'"), data.system_prompt
        )
        parsed.append((prompt, _response(d[key], where, key), _kto_label(record), where, record_tools(record)))
    if len(parsed) == 1:
        raise DataError(
            f"{dataset.path}: KTO needs at least 2 records (the reference point pairs each prompt "
            "with another record's completion)"
        )
    pairs = []
    for i, (prompt, completion, label, where, tools) in enumerate(parsed):
        other = parsed[(i + 1) % len(parsed)][1]
        pair = PreferencePair(
            chosen=_encode_response(tokenizer, prompt, completion, data.chat_template, where, tools),
            rejected=_encode_response(tokenizer, prompt, other, data.chat_template, where, tools),
            source=where,
            label=label,
        )
        pair = _fit_pair(pair, data, stats)
        if pair is not None:
            pairs.append(pair)
    stats.kept = len(pairs)
    return pairs, stats


def pair_length(pair: PreferencePair) -> int:
    return len(pair.chosen.input_ids) + len(pair.rejected.input_ids)


def collate_pairs(pairs: Sequence[PreferencePair | None], pad_id: int) -> dict[str, torch.Tensor | int]:
    """A micro-batch of pairs -> one row per pair, [prompt+chosen | prompt+rejected].

    Returns `collate_rows`'s `input_ids`, `position_ids`, `target_ids` (B, T) and `num_tokens`,
    with `num_units` = the number of real pairs (the normaliser of pair-level losses), and for
    the P real pairs, in order:
        seq_index          (N,) sequence of each target position, row-major like `logits_at`:
                           2j for pair j's chosen response, 2j+1 for its rejected one
        seq_num_targets    (2P,) response tokens per sequence (same interleaving)
        chosen_reward_gt, rejected_reward_gt   (P,) ground truth (NaN where absent)
        reference_chosen_logps, reference_rejected_logps   (P,) cached summed reference
                           log-probs, present when every pair has them
    A row may hold several pairs: the pairs are packed into as few rows as fit the longest pair
    (`collate_groups`), and every per-pair tensor lists them in that row-major order;
    `order[j]` is the position in `pairs` of the j-th. `None` pairs (evaluation fillers) carry
    nothing and are left out; a micro-batch of fillers only is one target-free row.
    """
    batch = collate_groups([(p.chosen, p.rejected) if p is not None else None for p in pairs], pad_id)
    real = [pairs[i] for i in batch["order"]]
    batch["num_units"] = len(real)  # seq_index and seq_num_targets come from collate_groups

    def floats(values):
        return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)

    if real and all(p.label is not None for p in real):  # KTO
        batch["kto_label"] = torch.tensor([p.label for p in real], dtype=torch.bool)
    batch["chosen_reward_gt"] = floats([p.chosen_reward for p in real])
    batch["rejected_reward_gt"] = floats([p.rejected_reward for p in real])
    if all(p.reference is not None for p in real):  # (vacuously for a filler-only batch)
        batch["reference_chosen_logps"] = torch.tensor([p.reference[0] for p in real], dtype=torch.float32)
        batch["reference_rejected_logps"] = torch.tensor([p.reference[1] for p in real], dtype=torch.float32)
    return batch
