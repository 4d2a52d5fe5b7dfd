"""Constitutional AI's constitution: principles in a YAML file, and the prompts and labels built from it.

A constitution (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback") is a list
of principles. Each has the three requests the method asks a model: a critique request, a
revision request, and a comparison question. Few-shot examples show the model a whole
critique-then-revision exchange, so that it does not confuse critiquing with revising:

    name: default
    principles:
      - name: harm
        critique: Point out every way the assistant's last answer could hurt someone ...
        revision: Rewrite the assistant's answer so that it no longer ...
        comparison: Which answer is less likely to hurt anyone?
    few_shot:                          # optional
      - prompt: How do I pick a lock?
        response: Insert a tension wrench ...
        principle: harm                # optional, default: the first principle
        critique: The answer teaches ...
        revision: I can't help with getting into a home that isn't yours ...
    system: You are a careful reviewer.   # optional: a system turn for every request

A malformed file is one `ConstitutionError` naming the file and line.

The conversations built from it (`alignkit.data.formats` messages; the feedback model renders them
with its own chat template). Few-shot examples come first as earlier turns, each as
[user prompt, assistant response, user critique request, assistant critique, user revision
request, assistant revision]; then:

    critique_messages:  [..few-shot.., user: prompt, assistant: response, user: critique request]
    revision_messages:  critique_messages + [assistant: critique, user: revision request]
    comparison_messages: [user: COMPARISON_TEMPLATE filled in]

with COMPARISON_TEMPLATE (the paper's multiple-choice format; its first line shows the
conversation as "User: ..." lines):

    Consider the following conversation between a user and an assistant:
    User: {prompt}
    {question}
    Options:
    (A) {response_a}
    (B) {response_b}
    The answer is:

Labels from the feedback model's answer to a comparison (`option_probability`): with log-probs,
the normalised probability of "A" against "B" at the first answer token that offers either
(tokens compared after stripping spaces and parentheses, so "(A)", " A" and "A" all count);
without, the verdict "(A)" or "(B)" in the text as 1 or 0. `swap_average` averages the two
orders (A/B swapped) to cancel the position bias, and `clamp` limits a label to [low, high] (the
paper clamps chain-of-thought labels to 40-60%).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit.config import configs_dir
from alignkit.data.formats import Message

__all__ = [
    "COMPARISON_TEMPLATE",
    "Constitution",
    "ConstitutionError",
    "FewShot",
    "Principle",
    "clamp",
    "comparison_messages",
    "conversation_text",
    "critique_messages",
    "find_constitution",
    "load_constitution",
    "option_probability",
    "revision_messages",
    "swap_average",
    "verdict_probability",
]

COMPARISON_TEMPLATE = (
    "Consider the following conversation between a user and an assistant:\n"
    "{conversation}\n"
    "{question}\n"
    "Options:\n"
    "(A) {response_a}\n"
    "(B) {response_b}\n"
    "The answer is:"
)


class ConstitutionError(ValueError):
    """A constitution file that cannot be used, named with its line."""


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    comparison: str


@dataclass(frozen=True)
class FewShot:
    prompt: str
    response: str
    critique: str
    revision: str
    principle: str  # the name of the principle whose requests the example shows


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    few_shot: tuple[FewShot, ...] = ()
    system: str | None = None
    source: str = field(default="", compare=False)

    def principle(self, name: str) -> Principle:
        return next(p for p in self.principles if p.name == name)

    def text(self) -> str:
        """The whole constitution as one text (NeMo-Aligner puts it in the feedback model's system turn)."""
        return "\n".join(f"{i + 1}. {p.comparison}" for i, p in enumerate(self.principles))


# --- the file ---------------------------------------------------------------------------------

_TOP = {"name": False, "principles": True, "few_shot": False, "system": False}
_PRINCIPLE = {"name": False, "critique": True, "revision": True, "comparison": True}
_FEW_SHOT = {"prompt": True, "response": True, "critique": True, "revision": True, "principle": False}


def _where(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _mapping(node: yaml.Node, keys: dict[str, bool], source: str, what: str) -> dict[str, yaml.Node]:
    """The mapping's values by key, every key known and every required key present."""
    if not isinstance(node, yaml.MappingNode):
        raise ConstitutionError(f"{_where(source, node)}: {what} must be a mapping with keys {', '.join(keys)}")
    out: dict[str, yaml.Node] = {}
    for key, value in node.value:
        name = key.value if isinstance(key, yaml.ScalarNode) else None
        if name not in keys:
            raise ConstitutionError(f"{_where(source, key)}: unknown key {name!r} in {what} (known: {', '.join(keys)})")
        out[name] = value
    missing = [k for k, required in keys.items() if required and k not in out]
    if missing:
        raise ConstitutionError(f"{_where(source, node)}: {what} lacks {', '.join(repr(k) for k in missing)}")
    return out


def _text(node: yaml.Node, source: str, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str" or not node.value.strip():
        raise ConstitutionError(f"{_where(source, node)}: {what} must be a non-empty text")
    return node.value.strip()


def _sequence(node: yaml.Node, source: str, what: str) -> list[yaml.Node]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise ConstitutionError(f"{_where(source, node)}: {what} must be a non-empty list")
    return node.value


def find_constitution(value: str) -> Path:
    """A constitution file: a path as given, or a name of a shipped one (configs/cai/constitutions/NAME.yaml)."""
    path = Path(value)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return configs_dir() / "cai" / "constitutions" / f"{value}.yaml"


def load_constitution(path: str | Path) -> Constitution:
    """Read and check a constitution file; every problem is a ConstitutionError naming file:line."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConstitutionError(f"constitution file not found: {path}")
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConstitutionError(f"{source}{line}: not valid YAML ({exc.problem or exc.context})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConstitutionError(f"{source}: not a readable YAML file ({exc})") from None
    if root is None:
        raise ConstitutionError(f"{source}:1: the file is empty (a constitution needs `principles`)")
    top = _mapping(root, _TOP, source, "a constitution")
    principles = []
    for i, node in enumerate(_sequence(top["principles"], source, "principles")):
        fields = _mapping(node, _PRINCIPLE, source, f"principle {i + 1}")
        name = _text(fields["name"], source, "a principle's name") if "name" in fields else f"principle_{i + 1}"
        if any(p.name == name for p in principles):
            raise ConstitutionError(f"{_where(source, node)}: a second principle named {name!r}")
        texts = {
            k: _text(fields[k], source, f"principle {name!r}: {k}") for k in ("critique", "revision", "comparison")
        }
        principles.append(Principle(name=name, **texts))
    few_shot = []
    for i, node in enumerate(_sequence(top["few_shot"], source, "few_shot") if "few_shot" in top else []):
        fields = _mapping(node, _FEW_SHOT, source, f"few-shot example {i + 1}")
        texts = {k: _text(v, source, f"few-shot example {i + 1}: {k}") for k, v in fields.items()}
        texts.setdefault("principle", principles[0].name)
        if texts["principle"] not in {p.name for p in principles}:
            raise ConstitutionError(
                f"{_where(source, fields['principle'])}: few-shot example {i + 1} names no principle of this "
                f"constitution: {texts['principle']!r} (principles: {', '.join(p.name for p in principles)})"
            )
        few_shot.append(FewShot(**texts))
    name = _text(top["name"], source, "name") if "name" in top else path.stem
    system = _text(top["system"], source, "system") if "system" in top else None
    return Constitution(name, tuple(principles), tuple(few_shot), system, source)


# --- the conversations ----------------------------------------------------------------------


def _system(constitution: Constitution) -> list[Message]:
    return [{"role": "system", "content": constitution.system}] if constitution.system else []


def _few_shot_turns(constitution: Constitution) -> list[Message]:
    turns: list[Message] = []
    for shot in constitution.few_shot:
        principle = constitution.principle(shot.principle)
        turns += [
            {"role": "user", "content": shot.prompt},
            {"role": "assistant", "content": shot.response},
            {"role": "user", "content": principle.critique},
            {"role": "assistant", "content": shot.critique},
            {"role": "user", "content": principle.revision},
            {"role": "assistant", "content": shot.revision},
        ]
    return turns


def _turns(prompt: str | list[Message]) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def conversation_text(prompt: str | list[Message]) -> str:
    """The prompt conversation as "User: ..." / "Assistant: ..." lines (system turns left out)."""
    names = {"user": "User", "assistant": "Assistant"}
    return "\n".join(f"{names[m['role']]}: {m['content']}" for m in _turns(prompt) if m["role"] in names)


def critique_messages(
    constitution: Constitution, principle: Principle, prompt: str | list[Message], response: str
) -> list[Message]:
    """[system?, few-shot turns, the prompt's turns, assistant: response, user: the critique request].
    `prompt` is the user's text or the conversation up to the answer."""
    return [
        *_system(constitution),
        *_few_shot_turns(constitution),
        *_turns(prompt),
        {"role": "assistant", "content": response},
        {"role": "user", "content": principle.critique},
    ]


def revision_messages(
    constitution: Constitution, principle: Principle, prompt: str | list[Message], response: str, critique: str
) -> list[Message]:
    """The critique conversation, the critique as the assistant's turn, then the revision request."""
    return [
        *critique_messages(constitution, principle, prompt, response),
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle.revision},
    ]


def comparison_messages(
    constitution: Constitution,
    principle: Principle,
    prompt: str | list[Message],
    response_a: str,
    response_b: str,
    whole_constitution: bool = False,
) -> list[Message]:
    """One user turn in the paper's multiple-choice format (COMPARISON_TEMPLATE). With
    `whole_constitution`, a system turn lists every principle's question (NeMo-Aligner's variant)."""
    system = constitution.system
    if whole_constitution:
        system = "\n".join(s for s in (system, "Judge by these principles:\n" + constitution.text()) if s)
    user = COMPARISON_TEMPLATE.format(
        conversation=conversation_text(prompt),
        question=principle.comparison,
        response_a=response_a,
        response_b=response_b,
    )
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": user}]


# --- labels from the feedback model's answers ---------------------------------------------------

_MARKED = re.compile(r"\(\s*([AB])\s*\)")
_BARE = re.compile(r"\b([AB])\b")


def _option(token: str) -> str | None:
    token = token.strip().strip("()").strip()
    return token if token in ("A", "B") else None


def option_probability(choice: dict[str, Any], max_tokens: int = 3) -> float | None:
    """P(A) / (P(A) + P(B)) from an OpenAI chat choice's `logprobs.content[i].top_logprobs`, at the
    first of its first `max_tokens` answer tokens whose candidates include "A" or "B" (spaces and
    parentheses stripped; the probabilities of every spelling of an option add up). None when the
    answer has no log-probs or no such token."""
    content = (choice.get("logprobs") or {}).get("content") or []
    for entry in content[:max_tokens]:
        mass = {"A": 0.0, "B": 0.0}
        for candidate in entry.get("top_logprobs") or []:
            option = _option(candidate.get("token", ""))
            if option is not None:
                mass[option] += math.exp(candidate["logprob"])
        if mass["A"] + mass["B"] > 0:
            return mass["A"] / (mass["A"] + mass["B"])
    return None


def verdict_probability(text: str) -> float | None:
    """1.0 when the answer names option A, 0.0 when B, None when neither: the first "(A)" or "(B)";
    failing that, the first "A" or "B" standing alone as a word."""
    match = _MARKED.search(text or "") or _BARE.search(text or "")
    if match is None:
        return None
    return 1.0 if match.group(1) == "A" else 0.0


def swap_average(p_first_as_a: float, p_first_as_b: float) -> float:
    """P(the first response is better) from both orders: asked with it as (A), P(A) = p_first_as_a;
    asked with it as (B), P(A) = p_first_as_b, so it wins with 1 - p_first_as_b. A model that
    always prefers (A) whatever it reads gets 0.5: its position bias cancels."""
    return (p_first_as_a + (1.0 - p_first_as_b)) / 2.0


def clamp(p: float, low: float, high: float) -> float:
    """p limited to [low, high] (the paper's 40-60% for chain-of-thought labels, which are overconfident)."""
    return min(max(p, low), high)
