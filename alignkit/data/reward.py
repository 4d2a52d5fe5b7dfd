"""Reward-model data: scored sequences, preference pairs and attribute-labelled responses.

A reward model reads one hidden state per sequence, at its LAST token (the end of the
response). A scored sequence is an `Example` whose only target is that last token: the target
mask marks where to read the score, so the rows of `collate_rows` (packing, padding, position
ids) serve reward models unchanged.

Accepted records:
- pairs (Bradley-Terry): everything `alignkit.data.preference` accepts, plus an optional
  `margin` (number, TRL's column; NeMo-Aligner's HelpSteer2-Preference strength |l|), used by
  the margin and scaled Bradley-Terry losses.
- attributes (regression):
  `{"prompt", "response", "attributes": {"helpfulness": 3, ...}}`: names not in the record, or
  null, are missing and masked out of the loss;
  NeMo-Aligner's `{"text", "label": [a_0, a_1, ...]}`: `text` is the already-rendered
  conversation, `label` follows the configured attribute order, and a negative value (their
  -100, or -1) is missing.
  A prompt or response may be a list of messages, as in SFT data.

Over-length sequences follow `data.overlength`: `truncate` keeps the first max_seq_len tokens
and reads the score at the last kept one (the response is cut: a warning-worthy choice for a
reward model, so `drop` is the default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from alignkit.config import DataConfig, DatasetConfig
from alignkit.data.batching import collate_groups, collate_rows
from alignkit.data.formats import Message, messages_from_value, with_system_prompt
from alignkit.data.io import DataError, Record, field_names, finite_number, read_records, shown
from alignkit.data.preference import parse_preference
from alignkit.data.tokenize import IGNORE, EncodeStats, Example, render_chat

__all__ = [
    "AttributeExample",
    "RewardPair",
    "collate_attribute_rows",
    "collate_reward_pairs",
    "encode_scored",
    "load_attribute_examples",
    "load_reward_pairs",
    "scored_example",
    "scored_ids",
]


@dataclass
class RewardPair:
    chosen: Example  # prompt + chosen response, target at its last token
    rejected: Example
    margin: float | None  # preference strength, if the record has one


@dataclass
class AttributeExample:
    example: Example
    targets: list[float]  # (A,) in the configured attribute order; NaN where missing
    source: str


def scored_example(ids: list[int], source: str) -> Example:
    """An Example whose only target marks the last token: where the score is read."""
    return Example(input_ids=ids, target_ids=[IGNORE] * (len(ids) - 1) + [ids[-1]], source=source)


def scored_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The tokens a reward model reads for `text`, up to its last token that is not the pad token.

    Transformers' `*ForSequenceClassification` scores a sequence at its last non-pad token. A
    template that ends with EOS, with pad = EOS (what alignkit sets for tokenizers without a pad
    token, e.g. GPT-2, Llama, Mistral), ends the text with "pad" tokens: scoring there instead would
    make a saved reward model score differently in plain transformers. Causal attention means the
    dropped tail changes nothing before it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    end = len(ids)
    while end > 1 and ids[end - 1] == pad:
        end -= 1
    return ids[:end]


def encode_scored(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    template: str | None,
    where: str,
    tools: list[dict] | None = None,
) -> Example:
    """A conversation (prompt + response messages) rendered with the chat template."""
    return _scored_text(tokenizer, render_chat(tokenizer, messages, template, where, tools=tools), where)


def _scored_text(tokenizer: PreTrainedTokenizerBase, text: str, where: str) -> Example:
    ids = scored_ids(tokenizer, text)
    if not ids:
        raise DataError(f"{where}: the text to score is empty (no tokens)")
    return scored_example(ids, where)


def _fit(example: Example, data: DataConfig, stats: EncodeStats) -> Example | None:
    n = len(example.input_ids)
    if n <= data.max_seq_len:
        return example
    if data.overlength == "error":
        raise DataError(
            f"{example.source}: sequence has {n} tokens, more than data.max_seq_len={data.max_seq_len} "
            "(set data.overlength to 'drop' or 'truncate')"
        )
    if data.overlength == "drop":
        stats.dropped[f"longer than max_seq_len={data.max_seq_len}"] += 1
        return None
    stats.truncated += 1
    return scored_example(example.input_ids[: data.max_seq_len], example.source)


def _margin(record: Record) -> float | None:
    value = record.data.get("margin")
    if value is None:
        return None
    number = finite_number(value)
    if number is None:
        raise DataError(f"{record.source}: field 'margin' must be a finite number, got {shown(value)}")
    return abs(number)


def load_reward_pairs(
    dataset: DatasetConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[RewardPair], EncodeStats]:
    """Tokenized preference pairs; a pair is dropped whole when either side is (stats count pairs)."""
    records = read_records(dataset.path, dataset.split, dataset.limit)
    stats = EncodeStats(total=len(records))
    pairs = []
    for record in records:
        parsed = parse_preference(record, data.system_prompt)
        sides = []
        for response in (parsed.chosen, parsed.rejected):
            scratch = EncodeStats()
            sides.append(
                _fit(
                    encode_scored(
                        tokenizer, [*parsed.prompt, *response], data.chat_template, record.source, parsed.tools
                    ),
                    data,
                    scratch,
                )
            )
            stats.dropped.update(scratch.dropped)
            stats.truncated += scratch.truncated
        if None not in sides:
            pairs.append(RewardPair(sides[0], sides[1], _margin(record)))
    stats.kept = len(pairs)
    return pairs, stats


def _attribute_targets(record: Record, attributes: Sequence[str]) -> list[float]:
    data, where = record.data, record.source
    if "label" in data:  # NeMo-Aligner: a list in attribute order, negative = missing
        label = data["label"]
        if not isinstance(label, list) or len(label) != len(attributes):
            raise DataError(
                f"{where}: field 'label' must be a list of {len(attributes)} numbers "
                f"(attributes {', '.join(attributes)}), got {shown(label)}"
            )
        values = dict(zip(attributes, label))
        missing = lambda v: v is None or (isinstance(v, (int, float)) and v < 0)  # noqa: E731
    else:
        values = data["attributes"]
        if not isinstance(values, dict):
            raise DataError(f"{where}: field 'attributes' must be an object of attribute -> number")
        missing = lambda v: v is None  # noqa: E731
    targets = []
    for name in attributes:
        value = values.get(name)
        if missing(value):
            targets.append(math.nan)
        elif finite_number(value) is None:
            raise DataError(f"{where}: attribute {name!r} must be a finite number, got {shown(value)}")
        else:
            targets.append(finite_number(value))
    if all(math.isnan(t) for t in targets):
        raise DataError(f"{where}: none of the attributes {', '.join(attributes)} is labelled")
    return targets


def load_attribute_examples(
    dataset: DatasetConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase, attributes: Sequence[str]
) -> tuple[list[AttributeExample], EncodeStats]:
    """Tokenized responses with their attribute targets, in `attributes` order."""
    records = read_records(dataset.path, dataset.split, dataset.limit)
    stats = EncodeStats(total=len(records))
    examples = []
    for record in records:
        d, where = record.data, record.source
        if "label" not in d and "attributes" not in d:
            raise DataError(
                f"{where}: missing field 'attributes' (or NeMo-Aligner's 'label'); found fields: {field_names(d)}"
            )
        targets = _attribute_targets(record, attributes)
        if isinstance(d.get("text"), str) and "prompt" not in d:
            example = _scored_text(tokenizer, d["text"], where)
        else:
            for key in ("prompt", "response"):
                if key not in d:
                    raise DataError(
                        f"{where}: missing field {key!r} (an attribute record has prompt, response "
                        "and attributes, or NeMo-Aligner's text and label)"
                    )
            messages = with_system_prompt(
                [
                    *messages_from_value(d["prompt"], "user", f"{where}: field 'prompt'"),
                    *messages_from_value(d["response"], "assistant", f"{where}: field 'response'"),
                ],
                data.system_prompt,
            )
            example = encode_scored(tokenizer, messages, data.chat_template, where)
        example = _fit(example, data, stats)
        if example is not None:
            examples.append(AttributeExample(example, targets, where))
    stats.kept = len(examples)
    return examples, stats


# --- micro-batches -------------------------------------------------------------------------


def collate_reward_pairs(pairs: Sequence[RewardPair | None], pad_id: int) -> dict:
    """Pairs as [prompt+chosen | prompt+rejected] groups with restarting positions, packed into as
    few rows as fit the longest pair (several pairs per row, little padding).

    Adds to `collate_rows`'s tensors: `ends` (B, T) bool, the last token of every sequence
    (chosen 2j, rejected 2j+1 in row-major order, j in packed order); `margin` (P,) in the same
    order (NaN where absent); `order[j]`, the position in `pairs` of the j-th pair;
    `num_units` = P real pairs. None pairs (evaluation fillers) are
    left out; a micro-batch of fillers only is one row without sequences.
    """
    batch = collate_groups([(p.chosen, p.rejected) if p is not None else None for p in pairs], pad_id)
    real = [pairs[i] for i in batch["order"]]
    batch["ends"] = batch.pop("target_ids") != IGNORE
    batch["margin"] = torch.tensor([math.nan if p.margin is None else p.margin for p in real], dtype=torch.float32)
    batch["num_units"] = len(real)
    return batch


def collate_attribute_rows(rows: Sequence[Sequence[AttributeExample] | None], pad_id: int) -> dict:
    """Packed rows of attribute examples.

    Adds `ends` (B, T) bool, `targets` and `mask` (S, A) for the S sequences in row-major
    order, and `num_units` = present (sequence, attribute) entries, the regression normaliser.
    """
    real = [e for row in rows for e in row or []]
    batch = collate_rows([[e.example for e in row] if row else None for row in rows], pad_id)
    batch["ends"] = batch.pop("target_ids") != IGNORE
    targets = torch.tensor([e.targets for e in real], dtype=torch.float32).reshape(len(real), -1)
    batch["mask"] = ~torch.isnan(targets)
    batch["targets"] = torch.nan_to_num(targets, nan=0.0)
    batch["num_units"] = int(batch["mask"].sum())
    return batch
