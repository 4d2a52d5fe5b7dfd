"""Sampling a whole prompt dataset into a JSONL file of samples: `alignkit generate`.

    alignkit generate --model runs/sft/final --prompts prompts.jsonl --out samples.jsonl --n 4

Prompt records are `{"prompt": text or messages}` or `{"messages": [...]}` (`builtin:` names too),
rendered with the model's chat template (a model without one, a base model, continues plain-text
prompts as they are). A SteerLM model (config.json has a `steerlm` entry) is
asked for target attributes: the record's own `attributes` (an object or a label), else the
`attributes` given, else its defaults; each row then carries the full `label` it was asked for.
Each prompt batch samples from its own seed (seed + the batch's first prompt index), so a
file's samples do not depend on what else is in it beyond its batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.config import SamplingConfig
from alignkit.data.formats import prompt_messages, read_prompt_records
from alignkit.data.io import DataError, Record, write_jsonl
from alignkit.data.steerlm import LabelError, SteerLMFormat, steered_prompt
from alignkit.generation.batches import check_prompt_lengths, sample_batches
from alignkit.generation.engine import build_engine
from alignkit.models.loading import load_for_eval

__all__ = ["generate_dataset"]


def _steered_prompts(
    records: list[Record], tokenizer, fmt: SteerLMFormat | None, attributes: str | None
) -> tuple[list[str], list[dict[str, str]]]:
    """Each record's prompt text (with its label line for a SteerLM model) and the label fields of its rows."""
    texts, labels = [], []
    for record in records:
        request = record.data.get("attributes", attributes)
        if tokenizer.chat_template is None:
            texts.append(_plain_prompt(record, fmt))
        else:
            try:
                texts.append(steered_prompt(tokenizer, prompt_messages(record), fmt, request, where=record.source))
            except LabelError as exc:
                raise DataError(f"{record.source}: {exc}") from None
        labels.append({"label": fmt.label(request)} if fmt else {})
    return texts, labels


def _plain_prompt(record: Record, fmt: SteerLMFormat | None) -> str:
    """A model without a chat template (a base model) continues text: a plain-text prompt is used
    as it is; a conversation cannot be rendered, which is the record's error, not a traceback."""
    prompt = record.data.get("prompt")
    if isinstance(prompt, str) and fmt is None:
        return prompt
    raise DataError(
        f"{record.source}: the model has no chat template, so a conversation cannot be rendered; give plain-text "
        'prompts ({"prompt": "..."}), which a base model continues as they are, or add a chat_template to '
        "the model's tokenizer_config.json"
    )


def generate_dataset(
    model_dir: str | Path, prompts: str, out: str | Path, params: SamplingConfig, attributes: str | None = None
) -> tuple[int, int, int]:
    """Sample `params.n` responses to every prompt record of `prompts` and write one row per sample to
    `out`: the prompt, the label (SteerLM), the response, its sample index, whether it ended (EOS or
    a stop string), its finish reason, token count and summed log-probability. Returns (samples
    written, prompts, samples that ended)."""
    records = read_prompt_records(prompts)
    model, tokenizer = load_for_eval(model_dir)
    texts, labels = _steered_prompts(records, tokenizer, SteerLMFormat.from_config(model.config), attributes)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    check_prompt_lengths(model, ids, params.max_new_tokens, [r.source for r in records])
    rows: list[dict[str, Any]] = []
    seed_of = lambda start: None if params.seed is None else params.seed + start  # noqa: E731
    engine = build_engine(model, tokenizer, params)
    for start, completions in sample_batches(engine, ids, params, seed_of):
        for c in completions:
            record = records[start + c.prompt_index].data
            rows.append(
                {
                    "prompt": record.get("prompt", record.get("messages")),
                    **labels[start + c.prompt_index],
                    "response": c.text,
                    "sample": len(rows) % params.n,
                    "is_end": c.is_end,
                    "finish_reason": c.finish_reason,
                    "num_tokens": len(c.token_ids),
                    "logprob": sum(c.logprobs),
                }
            )
    write_jsonl(rows, out)
    return len(rows), len(ids), sum(row["is_end"] for row in rows)
