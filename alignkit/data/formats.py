"""Turn SFT records of any accepted format into one conversation format.

Accepted (each record is one JSON object):
- prompt/response: `{"prompt": str, "response": str}`; NeMo-Aligner's `{"input", "output"}` and
  TRL's `{"prompt", "completion"}` too. A prompt or response may also be a list of messages.
- chat: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}`;
  NeMo-Aligner's `{"system": str, "conversations": [{"from": "User"|"Assistant", "value": str}]}` too.
- tool calling (TRL's tool datasets): an assistant message may carry `tool_calls` (a list of
  objects) with an empty or null `content`; a `tool` message (the tool's output) may carry
  `tool_call_id` and `name`; the record may list the tools' JSON schemas in `tools`.

The result is a list of `{"role", "content"}` messages (plus the tool fields where present);
the loss later covers the assistant messages only: tool outputs are context, never trained on.
"""

from __future__ import annotations

import json
from typing import Any

from alignkit.data.io import DataError, Record, field_names, read_records, shown

__all__ = [
    "ConfigSystemMessage",
    "Message",
    "ROLES",
    "messages_from_value",
    "prompt_messages",
    "read_prompt_records",
    "record_tools",
    "to_messages",
    "with_system_prompt",
]

Message = dict[str, Any]  # role and content strings; tool_calls (a list), tool_call_id and name where given
ROLES = ("system", "user", "assistant", "tool")
_PAIRS = (("prompt", "response"), ("input", "output"), ("prompt", "completion"))
# Optional string fields of a message, kept for the chat template (a tool result's call id and name).
_STRING_FIELDS = ("tool_call_id", "name")


class ConfigSystemMessage(dict):
    """The system turn that `data.system_prompt` adds: a plain message to the chat template, whose type
    lets a template error say that the turn came from the config, not from the record."""


def messages_from_value(value: Any, default_role: str, where: str) -> list[Message]:
    """A string (one message of `default_role`) or a list of role/content dicts."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return [_check_message(m, where, i) for i, m in enumerate(value)]
    raise DataError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")


def _check_message(message: Any, where: str, index: int) -> Message:
    if not isinstance(message, dict):
        raise DataError(f"{where}: message {index} is not an object (got {type(message).__name__})")
    if "from" in message and "role" not in message:  # NeMo-Aligner: {"from": "User", "value": ...}
        message = {"role": str(message["from"]).lower(), "content": message.get("value")}
    if "role" not in message:
        raise DataError(f"{where}: message {index} has no field 'role'")
    role = message["role"]
    if role not in ROLES:
        raise DataError(f"{where}: message {index} has role {shown(role)}; expected one of {', '.join(ROLES)}")
    out: Message = {"role": role, "content": _content(message, role, where, index)}
    if message.get("tool_calls") is not None:  # None: a column that other rows fill (datasets' schema)
        out["tool_calls"] = _tool_calls(message["tool_calls"], role, where, index)
    for key in _STRING_FIELDS:
        if message.get(key) is not None:
            if not isinstance(message[key], str):
                raise DataError(
                    f"{where}: message {index} field '{key}' must be a string, got {type(message[key]).__name__}"
                )
            out[key] = message[key]
    return out


def _content(message: dict, role: str, where: str, index: int) -> str:
    """The message's text; an assistant turn that only calls tools may have none (null or missing)."""
    content = message.get("content")
    if content is None and role == "assistant" and message.get("tool_calls"):
        return ""
    if "content" not in message:
        raise DataError(f"{where}: message {index} has no field 'content'")
    if not isinstance(content, str):
        raise DataError(f"{where}: message {index} content must be a string, got {type(content).__name__}")
    return content


def _tool_calls(calls: Any, role: str, where: str, index: int) -> list[dict[str, Any]]:
    if role != "assistant":
        raise DataError(f"{where}: message {index} has tool_calls, but only assistant messages call tools")
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise DataError(
            f"{where}: message {index} tool_calls must be a list of objects "
            '(e.g. {"type": "function", "function": {"name": ..., "arguments": {...}}})'
        )
    return calls


def record_tools(record: Record) -> list[dict[str, Any]] | None:
    """The record's `tools` (the JSON schemas of the functions it may call, for the chat template):
    a list of objects, or that list as a JSON string; None when absent."""
    tools = record.data.get("tools")
    if isinstance(tools, str) and not tools.strip():  # an empty column value: no tools
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            raise DataError(f"{record.source}: field 'tools' is a string but not JSON") from None
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{record.source}: field 'tools' must be a list of objects (JSON schemas of functions)")
    return tools or None


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """`messages` with `system_prompt` first, unless it is None or the conversation has its own."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [ConfigSystemMessage(role="system", content=system_prompt), *messages]
    return messages


def to_messages(record: Record, system_prompt: str | None = None) -> list[Message]:
    """The conversation in `record`, validated: some assistant turn, known roles, string contents."""
    data, where = record.data, record.source
    if "messages" in data:
        messages = messages_from_value(data["messages"], "user", where)
    elif "conversations" in data:
        messages = messages_from_value(data["conversations"], "user", where)
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: field 'system' must be a string, got {type(system).__name__}")
        if system:
            messages = [{"role": "system", "content": system}, *messages]
    else:
        for prompt_key, response_key in _PAIRS:
            if prompt_key in data and response_key in data:
                messages = messages_from_value(data[prompt_key], "user", where) + messages_from_value(
                    data[response_key], "assistant", where
                )
                break
        else:
            present = [k for pair in _PAIRS for k in pair if k in data]
            missing = next((p[1] if p[0] in data else p[0] for p in _PAIRS if p[0] in data or p[1] in data), None)
            detail = f"missing field '{missing}'" if missing and present else "no conversation fields"
            raise DataError(
                f"{where}: {detail} (expected prompt/response, input/output, messages or conversations; "
                f"found fields: {field_names(data)})"
            )
    messages = with_system_prompt(messages, system_prompt)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return messages


# --- prompt records (what every sampling path reads) ----------------------------------------


def prompt_messages(record: Record) -> list[Message]:
    """The conversation to answer: `prompt` (a string is one user message, or a list of messages)
    or, for chat records without the answer, `messages`. Errors name the record's file:line."""
    for key in ("prompt", "messages"):
        if key in record.data:
            messages = messages_from_value(record.data[key], "user", f"{record.source}: field '{key}'")
            if not messages:
                raise DataError(f"{record.source}: field '{key}' is an empty list; a prompt needs a message")
            return messages
    raise DataError(f"{record.source}: a prompt record needs a 'prompt' (text or messages) or 'messages' field")


def read_prompt_records(path: str, split: str | None = None, limit: int | None = None) -> list[Record]:
    """Prompt records, every one checked before any work starts (`prompt_messages`); an empty
    dataset is an error too."""
    records = read_records(path, split, limit)
    if not records:
        raise DataError(f"{path}: no prompt records")
    for record in records:
        prompt_messages(record)
    return records
