"""Chat rendering and tokenization with an assistant-only loss mask.

A conversation is rendered with the tokenizer's chat template. The characters that belong to
each assistant turn are found by rendering prefixes of the conversation (the text up to the
generation prompt before the turn, and the text including the turn); tokens overlapping
those characters carry loss, every other token does not. A template that is not
prefix-consistent (rendering fewer messages does not give a prefix of the full text) is
reported as an error rather than guessed around, since it would silently corrupt the mask.

Examples are stored already shifted for next-token prediction: `target_ids[t]` is the token
that position `t` must predict, or -100. Packing rows then never leaks a target across two
examples.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from alignkit.data.formats import ConfigSystemMessage, Message
from alignkit.data.io import DataError, clip

__all__ = [
    "IGNORE",
    "EncodeStats",
    "Example",
    "encode_conversation",
    "encode_spans",
    "encode_text",
    "fit_length",
    "render_chat",
    "render_with_spans",
]

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    target_ids: list[int]  # shifted: target_ids[t] is what position t predicts (IGNORE: no loss)
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE for t in self.target_ids)


@dataclass
class EncodeStats:
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.total} examples kept"]
        parts += [f"{n} dropped ({reason})" for reason, n in self.dropped.items()]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        return ", ".join(parts)


def _apply(tokenizer, messages, template, add_generation_prompt, tools) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    template: str | None,
    where: str,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
) -> str:
    """The conversation rendered by the chat template (`template`, else the tokenizer's). Whatever the
    template raises (Gemma's "System role not supported", a template without tool turns, ...) is a
    DataError naming `where`, the record's file:line, and what to change."""
    if template is None and tokenizer.chat_template is None:
        raise DataError(
            f"{where}: the tokenizer has no chat template; set data.chat_template (a Jinja template over `messages`)"
        )
    try:
        return _apply(tokenizer, messages, template, add_generation_prompt, tools)
    except Exception as exc:  # jinja2's TemplateError, or anything the template's own code raises
        hint = _template_hint(tokenizer, messages, template, add_generation_prompt, tools)
        raise DataError(f"{where}: the chat template failed: {clip(str(exc)) or type(exc).__name__}; {hint}") from None


def _template_hint(tokenizer, messages, template, add_generation_prompt, tools) -> str:
    """What to change when the template fails on `messages`: the system turn `data.system_prompt`
    added (when the conversation renders without it), tool turns, or the template itself."""
    own = [m for m in messages if not isinstance(m, ConfigSystemMessage)]
    if len(own) < len(messages):
        try:
            _apply(tokenizer, own, template, add_generation_prompt, tools)
            return (
                "it rejects the system turn that data.system_prompt adds (e.g. Gemma's template has no system "
                "role): unset data.system_prompt, or set data.chat_template to a template that takes one"
            )
        except Exception:  # noqa: BLE001 - the conversation fails without it too: not the system turn's fault
            pass
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return (
            "the conversation has tool calls or tool results, which a template without tool support rejects: "
            "set data.chat_template to one that renders them"
        )
    return "set data.chat_template to a template that renders this conversation"


def render_with_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    template: str | None,
    where: str,
    tools: list[dict] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character span of each assistant turn (an
    assistant turn that calls tools included; tool outputs are context, not spans)."""
    full = render_chat(tokenizer, messages, template, where, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], template, where, True, tools) if i else ""
        through = render_chat(tokenizer, messages[: i + 1], template, where, tools=tools)
        if i and not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{where}: the chat template is not prefix-consistent around assistant turn {i}, "
                "so the assistant tokens cannot be located; use a template that renders each turn "
                "independently (set data.chat_template)"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    template: str | None,
    where: str,
    tools: list[dict] | None = None,
) -> Example:
    """Token ids and shifted targets; targets cover assistant turns (their end token included)."""
    text, spans = render_with_spans(tokenizer, messages, template, where, tools)
    return encode_spans(tokenizer, text, spans, where)


def encode_spans(tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]], where: str) -> Example:
    """Token ids of `text` with shifted targets on the tokens that overlap the sorted character `spans`."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoding["input_ids"]
    labels = [IGNORE] * len(ids)
    span_index = 0
    for t, (start, end) in enumerate(encoding["offset_mapping"]):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index < len(spans) and start < spans[span_index][1] and end > spans[span_index][0]:
            labels[t] = ids[t]
    return Example(input_ids=ids, target_ids=(labels[1:] + [IGNORE]) if ids else [], source=where)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, where: str) -> Example:
    """Plain text for language-model (pre)training: every token carries loss; EOS appended
    unless the text already ends with it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return Example(input_ids=ids, target_ids=ids[1:] + [IGNORE], source=where)


def fit_length(example: Example, max_seq_len: int, policy: str, stats: EncodeStats) -> Example | None:
    """Apply the over-length policy; returns None (and counts why) for a dropped example."""
    n = len(example.input_ids)
    if n > max_seq_len:
        if policy == "error":
            raise DataError(
                f"{example.source}: example has {n} tokens, more than data.max_seq_len={max_seq_len} "
                "(set data.overlength to 'drop' or 'truncate' to handle such examples)"
            )
        if policy == "drop":
            stats.dropped[f"longer than max_seq_len={max_seq_len}"] += 1
            return None
        example = Example(
            example.input_ids[:max_seq_len], example.target_ids[:max_seq_len], example.source, example.extra
        )
        if example.num_targets == 0:
            stats.dropped["prompt fills max_seq_len, no response token left"] += 1
            return None
        stats.truncated += 1
    if example.num_targets == 0:
        stats.dropped["no loss token"] += 1
        return None
    return example
