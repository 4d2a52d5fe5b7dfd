"""SFT datasets end to end: records -> validated conversations (or plain text) -> masked token ids -> rows."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from alignkit.config import DataConfig, DatasetConfig
from alignkit.data.batching import pack_examples
from alignkit.data.formats import record_tools, to_messages
from alignkit.data.io import read_records
from alignkit.data.tokenize import EncodeStats, Example, encode_conversation, encode_text, fit_length

__all__ = ["load_sft_examples", "make_rows", "row_length"]

_CONVERSATION_KEYS = {"messages", "conversations", "prompt", "input"}


def load_sft_examples(
    dataset: DatasetConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Example], EncodeStats]:
    """Tokenized examples after the over-length policy. Conversations get assistant-only
    targets; `{"text": ...}` records (language-model pretraining) get targets on every token."""
    records = read_records(dataset.path, dataset.split, dataset.limit)
    stats = EncodeStats(total=len(records))
    examples = []
    for record in records:
        if isinstance(record.data.get("text"), str) and not _CONVERSATION_KEYS & record.data.keys():
            example = encode_text(tokenizer, record.data["text"], record.source)
        else:
            messages = to_messages(record, data.system_prompt)
            example = encode_conversation(tokenizer, messages, data.chat_template, record.source, record_tools(record))
        example = fit_length(example, data.max_seq_len, data.overlength, stats)
        if example is not None:
            examples.append(example)
    stats.kept = len(examples)
    return examples, stats


def make_rows(examples: list[Example], data: DataConfig) -> list[list[Example]]:
    """Packed rows of up to max_seq_len tokens, or one example per row."""
    return pack_examples(examples, data.max_seq_len) if data.pack else [[e] for e in examples]


def row_length(row: list[Example]) -> int:
    return sum(len(e.input_ids) for e in row)
