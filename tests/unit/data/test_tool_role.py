"""The `tool` role (TRL's tool-calling datasets) and chat templates that raise: every failure is one
DataError naming the record's file:line (and `data.system_prompt` when the turn it adds is the cause)."""

from __future__ import annotations

import json

import pytest

from alignkit.config import DataConfig, DatasetConfig
from alignkit.data.formats import prompt_messages, to_messages, with_system_prompt
from alignkit.data.io import DataError, Record
from alignkit.data.preference import load_preference_pairs
from alignkit.data.sft import load_sft_examples
from alignkit.data.steerlm import steered_prompt
from alignkit.data.tokenize import IGNORE, encode_conversation, render_chat

# A Qwen-like template: the tools' names in a system header, tool calls inside the assistant turn.
TOOL_TEMPLATE = (
    "{%- if tools %}<|system|>\ntools: {{ tools | map(attribute='function') | map(attribute='name') | join(',') }}"
    "</s>{% endif %}"
    "{%- for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<call>{{ c.function.name }}</call>{% endfor %}</s>{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Gemma's behaviour: no system role.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Llama 2 / Mistral v1 behaviour: user and assistant only, alternating.
NO_TOOLS_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
TOOL_CHAT = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "name": "weather", "content": "SUNNY 21C"},
        {"role": "assistant", "content": "Sunny, 21C."},
    ],
    "tools": TOOLS,
}


def _write(tmp_path, *records) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _data(path: str, **kw) -> DataConfig:
    return DataConfig(train=DatasetConfig(path=path), max_seq_len=512, **kw)


def _trained_text(tokenizer, example) -> tuple[str, str]:
    """(all text, the text of the tokens that carry loss) of an example."""
    ids, targets = example.input_ids, [IGNORE, *example.target_ids[:-1]]  # targets[t]: loss on token t
    trained = [i for i, t in zip(ids, targets) if t != IGNORE]
    return tokenizer.decode(ids), tokenizer.decode(trained)


def test_tool_conversation_loads_and_trains_on_assistant_turns_only(tmp_path, tokenizer):
    path = _write(tmp_path, TOOL_CHAT)
    (example,), _ = load_sft_examples(DatasetConfig(path=path), _data(path, chat_template=TOOL_TEMPLATE), tokenizer)
    text, trained = _trained_text(tokenizer, example)
    assert "tools: weather" in text  # the record's `tools` reach the template
    assert "SUNNY 21C" in text and "SUNNY" not in trained  # the tool's output is context
    assert "Weather in Paris" not in trained
    assert "<call>weather</call>" in trained and "Sunny, 21C." in trained  # both assistant turns


def test_preference_pair_after_a_tool_call_trains_on_the_response_only(tmp_path, tokenizer):
    prompt = TOOL_CHAT["messages"][:3]  # user, assistant calling the tool, the tool's result
    path = _write(tmp_path, {"prompt": prompt, "chosen": "Sunny.", "rejected": "Rainy.", "tools": TOOLS})
    (pair,), _ = load_preference_pairs(DatasetConfig(path=path), _data(path, chat_template=TOOL_TEMPLATE), tokenizer)
    text, trained = _trained_text(tokenizer, pair.chosen)
    assert "tools: weather" in text and "SUNNY 21C" in text and "<call>weather</call>" in text
    assert trained == "Sunny.</s>"  # not the prompt's tool call nor the tool's output
    assert _trained_text(tokenizer, pair.rejected)[1] == "Rainy.</s>"


def test_tool_fields_survive_and_null_columns_are_ignored():
    # datasets fills the fields other rows have with None: those are absent, not errors
    record = Record(
        {
            "messages": [
                {"role": "user", "content": "Q", "tool_calls": None, "tool_call_id": None, "name": None},
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "content": "R", "tool_call_id": "c1", "name": "weather"},
                {"role": "assistant", "content": "A"},
            ]
        },
        "f.jsonl:4",
    )
    messages = to_messages(record)
    assert messages[0] == {"role": "user", "content": "Q"}
    assert messages[1]["tool_calls"] == [CALL]
    assert messages[2] == {"role": "tool", "content": "R", "tool_call_id": "c1", "name": "weather"}
    # a prompt may end with a tool's result: the assistant answers it next
    assert prompt_messages(Record({"prompt": messages[:3]}, "p.jsonl:2"))[-1]["role"] == "tool"


@pytest.mark.parametrize(
    "message, error",
    [
        ({"role": "user", "content": "Q", "tool_calls": [CALL]}, "only assistant messages call tools"),
        ({"role": "assistant", "content": "", "tool_calls": {"name": "x"}}, "tool_calls must be a list of objects"),
        ({"role": "assistant", "content": None}, "content must be a string, got NoneType"),
        ({"role": "tool", "content": "R", "tool_call_id": 7}, "field 'tool_call_id' must be a string"),
        ({"role": "tool"}, "has no field 'content'"),
        ({"role": "function", "content": "R"}, "expected one of system, user, assistant, tool"),
    ],
)
def test_bad_tool_messages_name_the_line(message, error):
    messages = [{"role": "user", "content": "Q"}, message, {"role": "assistant", "content": "A"}]
    record = Record({"messages": messages}, "f.jsonl:9")
    with pytest.raises(DataError, match=rf"^f.jsonl:9: message 1 .*{error}"):
        to_messages(record)


@pytest.mark.parametrize("tools", ['[{"type": "function"', {"name": "x"}, [1]])
def test_bad_tools_field_names_the_line(tmp_path, tokenizer, tools):
    path = _write(tmp_path, {"prompt": "Q", "response": "A"}, {**TOOL_CHAT, "tools": tools})
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'tools'"):
        load_sft_examples(DatasetConfig(path=path), _data(path), tokenizer)


def test_tools_as_a_json_string_are_read(tmp_path, tokenizer):
    path = _write(tmp_path, {**TOOL_CHAT, "tools": json.dumps(TOOLS)})
    (example,), _ = load_sft_examples(DatasetConfig(path=path), _data(path, chat_template=TOOL_TEMPLATE), tokenizer)
    assert "tools: weather" in tokenizer.decode(example.input_ids)


def test_template_rejecting_the_configured_system_prompt_names_record_and_setting(tmp_path, tokenizer):
    path = _write(tmp_path, {"prompt": "Q", "response": "A"}, {"prompt": "Q2", "response": "A2"})
    data = _data(path, chat_template=NO_SYSTEM_TEMPLATE, system_prompt="Be brief.")
    with pytest.raises(DataError) as err:
        load_sft_examples(DatasetConfig(path=path), data, tokenizer)
    message = str(err.value)
    assert message.startswith(f"{path}:1: the chat template failed: System role not supported")
    assert "data.system_prompt" in message and "\n" not in message
    # without the setting the same data renders
    load_sft_examples(DatasetConfig(path=path), _data(path, chat_template=NO_SYSTEM_TEMPLATE), tokenizer)


def test_preference_pairs_with_a_rejected_system_prompt(tmp_path, tokenizer):
    path = _write(tmp_path, {"prompt": "Q", "chosen": "A", "rejected": "B"})
    data = _data(path, chat_template=NO_SYSTEM_TEMPLATE, system_prompt="Be brief.")
    with pytest.raises(DataError, match=rf"^{path}:1: the chat template failed: .*data.system_prompt"):
        load_preference_pairs(DatasetConfig(path=path), data, tokenizer)


def test_the_records_own_system_turn_does_not_blame_the_setting(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    with pytest.raises(DataError, match="^p.jsonl:5: the chat template failed") as err:
        render_chat(tokenizer, messages, NO_SYSTEM_TEMPLATE, "p.jsonl:5", add_generation_prompt=True)
    assert "data.system_prompt" not in str(err.value)


def test_prompt_rendering_with_a_rejected_system_prompt(tokenizer):
    # what the sampling recipes render: the prompt record, the configured system prompt, the generation prompt
    record = Record({"prompt": "Q"}, "prompts.jsonl:3")
    messages = with_system_prompt(prompt_messages(record), "Be brief.")
    with pytest.raises(DataError, match=r"^prompts.jsonl:3: .*System role not supported.*data.system_prompt"):
        render_chat(tokenizer, messages, NO_SYSTEM_TEMPLATE, record.source, add_generation_prompt=True)
    with pytest.raises(DataError, match=r"^prompts.jsonl:3: .*data.system_prompt"):
        steered_prompt(tokenizer, messages, None, chat_template=NO_SYSTEM_TEMPLATE, where=record.source)


def test_template_without_tool_support_is_one_error_naming_the_record(tmp_path, tokenizer):
    path = _write(tmp_path, {"prompt": "Q", "response": "A"}, TOOL_CHAT)
    with pytest.raises(DataError) as err:
        load_sft_examples(DatasetConfig(path=path), _data(path, chat_template=NO_TOOLS_TEMPLATE), tokenizer)
    message = str(err.value)
    assert message.startswith(f"{path}:2: the chat template failed: Conversation roles must alternate")
    assert "tool" in message.split(";", 1)[1] and "\n" not in message


def test_a_template_that_breaks_on_its_own_is_reported_too(tokenizer):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    with pytest.raises(DataError, match=r"^f.jsonl:2: the chat template failed: .*set data.chat_template"):
        encode_conversation(tokenizer, messages, "{{ messages[0].content + 1 }}", "f.jsonl:2")
    with pytest.raises(DataError, match=r"^f.jsonl:2: the chat template failed"):
        encode_conversation(tokenizer, messages, "{% for %}", "f.jsonl:2")  # not even valid Jinja
