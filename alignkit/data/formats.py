"""Turn SFT records of any accepted format into one conversation format.

Accepted (each record is one JSON object):
- prompt/response: `{"prompt": str, "response": str}`; NeMo-Aligner's `{"input", "output"}` and
  TRL's `{"prompt", "completion"}` too. A prompt or response may also be a list of messages.
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`;
  NeMo-Aligner's `{"system": str, "conversations": [{"from": "User"|"Assistant", "value": str}]}` too.

The result is a list of `{"role", "content"}` messages; the loss later covers the assistant
messages only.
"""

from __future__ import annotations

from typing import Any

from alignkit.data.io import DataError, Record, read_records

__all__ = [
    "Message",
    "ROLES",
    "messages_from_value",
    "prompt_messages",
    "read_prompt_records",
    "to_messages",
    "with_system_prompt",
]

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
_PAIRS = (("prompt", "response"), ("input", "output"), ("prompt", "completion"))


def messages_from_value(value: Any, default_role: str, where: str) -> list[Message]:
    """A string (one message of `default_role`) or a list of role/content dicts."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return [_check_message(m, where, i) for i, m in enumerate(value)]
    raise DataError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")


def _check_message(message: Any, where: str, index: int) -> Message:
    if not isinstance(message, dict):
        raise DataError(f"{where}: message {index} is not an object")
    if "from" in message and "role" not in message:  # NeMo-Aligner: {"from": "User", "value": ...}
        message = {"role": str(message["from"]).lower(), "content": message.get("value")}
    for key in ("role", "content"):
        if key not in message:
            raise DataError(f"{where}: message {index} has no field '{key}'")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DataError(f"{where}: message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise DataError(f"{where}: message {index} content must be a string, got {type(content).__name__}")
    return {"role": role, "content": content}


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """`messages` with `system_prompt` first, unless it is None or the conversation has its own."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def to_messages(record: Record, system_prompt: str | None = None) -> list[Message]:
    """The conversation in `record`, validated: some assistant turn, known roles, string contents."""
    data, where = record.data, record.source
    if "messages" in data:
        messages = messages_from_value(data["messages"], "user", where)
    elif "conversations" in data:
        messages = messages_from_value(data["conversations"], "user", where)
        if data.get("system"):
            messages = [{"role": "system", "content": data["system"]}, *messages]
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
                f"found fields: {', '.join(sorted(data)) or 'none'})"
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
            return messages_from_value(record.data[key], "user", f"{record.source}: field '{key}'")
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
