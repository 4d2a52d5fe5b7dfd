"""Reward-model data: pairs with margins, attribute labels (both formats), over-length, collation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.config import DataConfig, DatasetConfig
from alignkit.data.io import DataError
from alignkit.data.reward import (
    collate_attribute_rows,
    collate_reward_pairs,
    load_attribute_examples,
    load_reward_pairs,
)

ATTRS = ["helpfulness", "correctness", "verbosity"]


def write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def data_cfg(path, **kw):
    return DataConfig(train=DatasetConfig(path=str(path)), **kw)


def test_pairs_keep_the_margin_and_score_the_last_token(tmp_path, tokenizer):
    path = write(
        tmp_path,
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": -0.5},
            {"prompt": "hi", "chosen_response": "hello", "rejected_response": "go away"},
        ],
    )
    pairs, stats = load_reward_pairs(DatasetConfig(path=str(path)), data_cfg(path), tokenizer)
    assert stats.kept == 2 and pairs[0].margin == 0.5 and pairs[1].margin is None  # |l|, as NeMo-Aligner
    text = tokenizer.decode(pairs[0].chosen.input_ids)
    assert text.endswith("4</s>") and "2+2?" in text
    assert pairs[0].chosen.num_targets == 1 and pairs[0].chosen.target_ids[-1] != -100

    batch = collate_reward_pairs([pairs[0], None, pairs[1]], tokenizer.pad_token_id)
    assert batch["num_units"] == 2 and batch["ends"].sum() == 4 and sorted(batch["order"]) == [0, 2]
    packed = [[pairs[0], None, pairs[1]][i] for i in batch["order"]]
    flat_ids, flat_ends = batch["input_ids"].reshape(-1), batch["ends"].reshape(-1)
    ends = flat_ends.nonzero().squeeze(-1).tolist()  # chosen 0, rejected 0, chosen 1, rejected 1
    width = batch["input_ids"].shape[1]
    for j, pair in enumerate(packed):
        c_end, r_end = ends[2 * j], ends[2 * j + 1]
        assert r_end - c_end == len(pair.rejected.input_ids) and c_end // width == r_end // width  # one row
        assert flat_ids[c_end - len(pair.chosen.input_ids) + 1 : c_end + 1].tolist() == pair.chosen.input_ids
        assert flat_ids[c_end] == tokenizer.eos_token_id
        assert batch["position_ids"].reshape(-1)[c_end + 1] == 0  # rejected restarts its positions
    margins = {0.5 if p.margin is not None else "nan" for p in packed}
    assert margins == {0.5, "nan"}
    assert [m if not math.isnan(m) else None for m in batch["margin"].tolist()] == [p.margin for p in packed]
    filler_only = collate_reward_pairs([None, None], tokenizer.pad_token_id)
    assert filler_only["num_units"] == 0 and not filler_only["ends"].any()


def test_bad_margin_names_the_line(tmp_path, tokenizer):
    path = write(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}])
    with pytest.raises(DataError, match=r"data.jsonl:1: field 'margin'"):
        load_reward_pairs(DatasetConfig(path=str(path)), data_cfg(path), tokenizer)


def test_attribute_records_in_both_formats(tmp_path, tokenizer):
    path = write(
        tmp_path,
        [
            {"prompt": "q", "response": "a", "attributes": {"helpfulness": 3, "verbosity": 1, "other": 9}},
            {"text": "<|user|>\nq</s><|assistant|>\nb</s>", "label": [4, -100, 2]},
        ],
    )
    examples, _ = load_attribute_examples(DatasetConfig(path=str(path)), data_cfg(path), tokenizer, ATTRS)
    assert examples[0].targets[0] == 3 and math.isnan(examples[0].targets[1]) and examples[0].targets[2] == 1
    assert examples[1].targets[0] == 4 and math.isnan(examples[1].targets[1]) and examples[1].targets[2] == 2
    # The NeMo text and the rendered prompt/response are tokenized the same way.
    assert tokenizer.decode(examples[1].example.input_ids) == "<|user|>\nq</s><|assistant|>\nb</s>"

    batch = collate_attribute_rows([[examples[0], examples[1]], None], tokenizer.pad_token_id)
    assert batch["ends"].sum() == 2 and batch["ends"][1].sum() == 0
    assert batch["mask"].tolist() == [[True, False, True], [True, False, True]]
    assert batch["num_units"] == 4
    assert torch.equal(batch["targets"], torch.tensor([[3.0, 0, 1], [4, 0, 2]]))


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "q", "response": "a"}, r"data.jsonl:1: missing field 'attributes'"),
        ({"prompt": "q", "response": "a", "attributes": {"helpfulness": "high"}}, r"attribute 'helpfulness' must be"),
        ({"prompt": "q", "response": "a", "attributes": {"politeness": 2}}, r"none of the attributes"),
        ({"text": "x", "label": [1, 2]}, r"field 'label' must be a list of 3 numbers"),
        ({"response": "a", "attributes": {"helpfulness": 1}}, r"missing field 'prompt'"),
    ],
)
def test_bad_attribute_records_are_named(tmp_path, tokenizer, record, message):
    path = write(tmp_path, [record])
    with pytest.raises(DataError, match=message):
        load_attribute_examples(DatasetConfig(path=str(path)), data_cfg(path), tokenizer, ATTRS)


def test_overlength_policies(tmp_path, tokenizer):
    path = write(
        tmp_path,
        [
            {"prompt": "q", "response": "x" * 200, "attributes": {"helpfulness": 1}},
            {"prompt": "q", "response": "y", "attributes": {"helpfulness": 2}},
        ],
    )
    spec = DatasetConfig(path=str(path))
    kept, stats = load_attribute_examples(spec, data_cfg(path, max_seq_len=64), tokenizer, ATTRS)
    assert len(kept) == 1 and stats.kept == 1 and sum(stats.dropped.values()) == 1
    cut, stats = load_attribute_examples(spec, data_cfg(path, max_seq_len=64, overlength="truncate"), tokenizer, ATTRS)
    assert len(cut[0].example.input_ids) == 64 and cut[0].example.target_ids[63] != -100 and stats.truncated == 1
    with pytest.raises(DataError, match=r"data.jsonl:1: sequence has \d+ tokens, more than data.max_seq_len=64"):
        load_attribute_examples(spec, data_cfg(path, max_seq_len=64, overlength="error"), tokenizer, ATTRS)
