"""SteerLM attribute labels and attribute-conditioned conversations.

SteerLM (Dong et al. 2023) conditions a model on the attributes of the response it should write.
The label string is the attribute values, clipped to 0..4 and rounded (as NeMo-Aligner's
`attribute_annotate.py` does with its reward model's outputs), in a fixed order:
`helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:1`. Parsing is strict: a malformed
label is an error that says what is wrong, never a silently dropped attribute.

Where the label goes: by default in the assistant turn's header, as NeMo-Aligner does
(`<extra_id_1>Assistant\n<extra_id_2>{labels}\n{response}`): the conversation is rendered with the
tokenizer's own chat template up to the generation prompt, then `label_template` (default
`"[{label}]\n"`) is appended, then the response. Training puts the loss on the response (and its
end token) only; inference appends the same line after the generation prompt, so any chat
template works. The format travels with the trained model: `config.json` gets a `steerlm` entry
(attribute names, template, and the default level of each attribute, used for attributes a
request leaves out), which `alignkit generate` and `alignkit serve generate` read.

`annotate` writes the labels: any reward source that returns attributes scores each record's last
response (`alignkit annotate`, and the `steerlm` recipe's `annotate` section).
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from alignkit.data.formats import Message, to_messages
from alignkit.data.io import DataError, Record, field_names, shown
from alignkit.data.tokenize import Example, encode_spans, render_chat

__all__ = [
    "DEFAULT_ATTRIBUTES",
    "DEFAULT_LABEL_TEMPLATE",
    "LabelError",
    "SteerLMFormat",
    "annotate",
    "encode_steerlm",
    "format_attribute_label",
    "parse_attribute_label",
    "record_targets",
    "steered_prompt",
    "to_level",
]

DEFAULT_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
DEFAULT_LABEL_TEMPLATE = "[{label}]\n"
MIN_LEVEL, MAX_LEVEL = 0, 4


class LabelError(ValueError):
    """A SteerLM attribute label that cannot be read."""


def format_attribute_label(values: Mapping[str, float], names: Sequence[str] = DEFAULT_ATTRIBUTES) -> str:
    """`name:level,...` in the order of `names`; each value clipped to 0..4 and rounded (half up).

    Example: {"helpfulness": 3.6, "verbosity": -0.4} with names (helpfulness, verbosity) ->
    "helpfulness:4,verbosity:0".
    """
    parts = []
    for name in names:
        if name not in values:
            raise LabelError(f"no value for attribute {name!r} (have: {field_names(values)})")
        parts.append(f"{name}:{to_level(values[name], name)}")
    return ",".join(parts)


def to_level(value: Any, name: str = "attribute") -> int:
    """A score -> a level: clipped to 0..4 and rounded half up."""
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise LabelError(f"attribute {name!r} has a non-numeric or too large value {shown(value)}") from None
    if not math.isfinite(value):
        raise LabelError(f"attribute {name!r} has a non-finite value {shown(value)}")
    return int(math.floor(min(max(value, MIN_LEVEL), MAX_LEVEL) + 0.5))


def parse_attribute_label(label: str, names: Sequence[str] | None = DEFAULT_ATTRIBUTES) -> dict[str, int]:
    """`name:level,...` -> {name: level}. With `names`, exactly those attributes, in that order."""
    if not isinstance(label, str) or not label.strip():
        raise LabelError(f"empty attribute label {shown(label)}")
    out: dict[str, int] = {}
    for part in label.strip().split(","):
        name, sep, raw = part.strip().partition(":")
        if not sep or not name:
            raise LabelError(f"label {shown(label)}: {shown(part)} is not name:level")
        try:
            level = int(raw)
        except ValueError:
            raise LabelError(f"label {shown(label)}: level {shown(raw)} of {shown(name)} is not an integer") from None
        if not MIN_LEVEL <= level <= MAX_LEVEL:
            raise LabelError(
                f"label {shown(label)}: level {level} of {shown(name)} is outside {MIN_LEVEL}..{MAX_LEVEL}"
            )
        if name in out:
            raise LabelError(f"label {shown(label)}: attribute {shown(name)} appears twice")
        out[name] = level
    if names is not None and list(out) != list(names):
        unknown = [n for n in out if n not in names]
        missing = [n for n in names if n not in out]
        detail = "; ".join(
            filter(
                None,
                [
                    f"unknown {unknown}" if unknown else "",
                    f"missing {missing}" if missing else "",
                    "" if unknown or missing else "out of order",
                ],
            )
        )
        raise LabelError(f"label {shown(label)}: expected the attributes {', '.join(names)} in this order ({detail})")
    return out


@dataclass(frozen=True)
class SteerLMFormat:
    """How a SteerLM model reads its target attributes.

    attributes: the label's attribute names, in order.
    label_template: text appended after the chat template's generation prompt; `{label}` is
        replaced by the label string.
    defaults: the level of each attribute a request leaves out (the recipe records the most
        common level of each attribute in its training labels).
    """

    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
    label_template: str = DEFAULT_LABEL_TEMPLATE
    defaults: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "{label}" not in self.label_template:
            raise LabelError(f"label_template {self.label_template!r} has no {{label}} placeholder")
        if len(set(self.attributes)) != len(self.attributes) or not self.attributes:
            raise LabelError(f"attribute names must be distinct and non-empty, got {list(self.attributes)}")

    def targets(self, request: Mapping[str, Any] | str | None = None) -> dict[str, int]:
        """Full targets from a request: a label string or {name: level} that may name only some
        attributes (the rest take `defaults`); unknown names are an error."""
        if isinstance(request, str):
            request = parse_attribute_label(request, names=None)
        if request is not None and not isinstance(request, Mapping):
            raise LabelError(
                f"target attributes must be a label string or an object of name -> level, got {shown(request)}"
            )
        request = dict(request or {})
        unknown = [n for n in request if n not in self.attributes]
        if unknown:
            close = difflib.get_close_matches(unknown[0], self.attributes, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LabelError(
                f"unknown attribute(s) {shown(unknown)}{hint}; this model is steered by {', '.join(self.attributes)}"
            )
        missing = [n for n in self.attributes if n not in request and n not in self.defaults]
        if missing:
            raise LabelError(f"no target for attribute(s) {missing} and no default level recorded for them")
        return {n: to_level(request[n], n) if n in request else int(self.defaults[n]) for n in self.attributes}

    def label(self, request: Mapping[str, Any] | str | None = None) -> str:
        return format_attribute_label(self.targets(request), self.attributes)

    def label_line(self, request: Mapping[str, Any] | str | None = None) -> str:
        return self.label_template.replace("{label}", self.label(request))

    def to_config(self) -> dict[str, Any]:
        return {
            "attributes": list(self.attributes),
            "label_template": self.label_template,
            "defaults": dict(self.defaults),
        }

    @classmethod
    def from_config(cls, config: Any) -> SteerLMFormat | None:
        """The format saved in a model's config (`config.steerlm`), or None for a model that is not a SteerLM model."""
        entry = getattr(config, "steerlm", None)
        if not entry:
            return None
        return cls(
            tuple(entry["attributes"]),
            entry.get("label_template", DEFAULT_LABEL_TEMPLATE),
            {k: int(v) for k, v in (entry.get("defaults") or {}).items()},
        )

    @staticmethod
    def most_common_levels(labels: Sequence[Mapping[str, int]], names: Sequence[str]) -> dict[str, int]:
        """The most common level of each attribute (ties: the higher level)."""
        out = {}
        for name in names:
            counts = Counter(label[name] for label in labels)
            out[name] = max(counts, key=lambda level: (counts[level], level)) if counts else MAX_LEVEL
        return out


def record_targets(data: Mapping[str, Any], names: Sequence[str], where: str) -> dict[str, int]:
    """The target attributes of a record: a `label` string (all of `names`, in order) or an
    `attributes` object {name: value} (values clipped to 0..4 and rounded). In NeMo-Aligner's
    conversation format the label may sit on the last assistant turn instead."""
    label = data.get("label")
    if label is None and isinstance(data.get("conversations"), list):
        turns = [
            t for t in data["conversations"] if isinstance(t, dict) and str(t.get("from", "")).lower() == "assistant"
        ]
        label = turns[-1].get("label") if turns else None
    try:
        if isinstance(label, str):
            return parse_attribute_label(label, names)
        if isinstance(data.get("attributes"), Mapping):
            return parse_attribute_label(format_attribute_label(data["attributes"], names), names)
    except LabelError as exc:
        raise DataError(f"{where}: {exc}") from None
    raise DataError(
        f"{where}: a SteerLM record needs a 'label' string (e.g. "
        f"{format_attribute_label(dict.fromkeys(names, 4), names)!r}) or an 'attributes' object"
    )


def steered_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    fmt: SteerLMFormat | None,
    request: Mapping[str, Any] | str | None = None,
    chat_template: str | None = None,
    where: str = "the conversation",
) -> str:
    """The prompt text for generation: the conversation up to the generation prompt, then (for a
    SteerLM model, `fmt` not None) the label line of `request` (missing attributes: the defaults).
    Target attributes for a model that is not a SteerLM model are an error, not ignored. A template
    failure is a DataError naming `where` (a record's file:line)."""
    text = render_chat(tokenizer, messages, chat_template, where, add_generation_prompt=True)
    if fmt is None:
        if request:
            raise LabelError(
                "target attributes were given, but this model is not a SteerLM model "
                "(its config.json has no `steerlm` entry)"
            )
        return text
    return text + fmt.label_line(request)


def encode_steerlm(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], label_line: str, chat_template: str | None, where: str
) -> Example:
    """An attribute-conditioned example: [conversation up to the generation prompt][label line]
    [last assistant turn]; targets cover the last assistant turn only (earlier turns are context)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: a SteerLM conversation must end with the assistant response to learn")
    before = render_chat(tokenizer, messages[:-1], chat_template, where, add_generation_prompt=True)
    full = render_chat(tokenizer, messages, chat_template, where)
    if not full.startswith(before):
        raise DataError(
            f"{where}: the chat template is not prefix-consistent (the rendered conversation does not "
            "start with the rendered prompt), so the label cannot be placed; set data.chat_template"
        )
    text = before + label_line + full[len(before) :]
    return encode_spans(tokenizer, text, [(len(before) + len(label_line), len(text))], where)


# --- annotation: attribute scores -> labels -------------------------------------------------


def _prompt_and_response(record: Record) -> tuple[Any, str]:
    messages = to_messages(record)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{record.source}: the conversation must end with the assistant response to annotate")
    context = messages[:-1]
    prompt = context[0]["content"] if len(context) == 1 and context[0]["role"] == "user" else context
    return prompt, messages[-1]["content"]


def annotate(records: list[Record], source, names: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
    """Each record with `label`: the source's attribute scores for its last response, clipped to
    0..4 and rounded, in the order of `names`. The source must return those attributes."""
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts, responses = zip(*(_prompt_and_response(r) for r in chunk))
        scored = source(list(prompts), list(responses))
        missing = [n for n in names if n not in scored.names]
        if scored.attributes is None or missing:
            raise DataError(
                f"the attribute source returns attributes {scored.names or 'none'}; the label needs {missing or names}"
            )
        columns = [scored.names.index(n) for n in names]
        for record, row in zip(chunk, scored.attributes.tolist()):
            label = format_attribute_label({n: row[c] for n, c in zip(names, columns)}, names)
            out.append({**record.data, "label": label})
    return out
