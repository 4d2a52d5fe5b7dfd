"""Preference pairs (alignkit.data.preference): parsing, response-only masks, the over-length
policy per pair, and the one-forward packed scoring of chosen and rejected responses.

The property the DPO recipe rests on: the per-sequence log-probs gathered by a segment sum
over one packed forward pass equal those of separate, unpacked forward passes.
"""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.config import DataConfig, DatasetConfig
from alignkit.data.batching import PAD_SLOT
from alignkit.data.io import DataError, Record, read_records
from alignkit.data.preference import (
    collate_pairs,
    encode_pair,
    load_preference_pairs,
    parse_preference,
)
from alignkit.data.tokenize import IGNORE
from alignkit.recipes.dpo import policy_logps
from tests.conftest import tiny_model


def rec(data, where="f.jsonl:3"):
    return Record(data, where)


def targets_text(tokenizer, example):
    """The text of the tokens that carry a target (the shifted targets, decoded)."""
    return tokenizer.decode([t for t in example.target_ids if t != IGNORE])


# --- parsing -------------------------------------------------------------------------------


def test_string_fields():
    p = parse_preference(rec({"prompt": "Q?", "chosen": "good", "rejected": "bad"}))
    assert p.prompt == [{"role": "user", "content": "Q?"}]
    assert p.chosen == [{"role": "assistant", "content": "good"}]
    assert p.rejected == [{"role": "assistant", "content": "bad"}]
    assert p.chosen_reward is None and p.rejected_reward is None


def test_nemo_names_and_rewards():
    p = parse_preference(
        rec(
            {
                "prompt": "Q?",
                "chosen_response": "good",
                "rejected_response": "bad",
                "chosen_reward": 1,
                "rejected_reward": 0.25,
            }
        ),
        require_rewards=True,
    )
    assert p.chosen[0]["content"] == "good" and p.rejected[0]["content"] == "bad"
    assert (p.chosen_reward, p.rejected_reward) == (1.0, 0.25)


def test_message_lists_and_system_prompt():
    prompt = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Q?"},
    ]
    p = parse_preference(
        rec(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}],
            }
        ),
        system_prompt="Be nice.",
    )
    assert [m["role"] for m in p.prompt] == ["system", "user", "assistant", "user"]
    assert p.chosen == [{"role": "assistant", "content": "good"}]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"prompt": "Q?", "chosen": "a"}, "missing field(s) 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "missing field(s) 'prompt'"),
        ({"prompt": "Q?", "response": "a"}, "missing field(s) 'chosen', 'rejected'"),
        ({"prompt": "Q?", "chosen": 3, "rejected": "b"}, "field 'chosen': expected a string or a list of messages"),
        ({"prompt": "Q?", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "list of assistant messages"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "field 'prompt' is an empty list"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "ends with an assistant"),
        (
            {"prompt": "Q?", "chosen": "a", "rejected": "b", "chosen_reward": "high"},
            "'chosen_reward' must be a finite number",
        ),
    ],
)
def test_malformed_records_name_file_and_line(data, message):
    with pytest.raises(DataError, match="f.jsonl:3") as info:
        parse_preference(rec(data))
    assert message in str(info.value)


def test_rpo_needs_rewards(tmp_path):
    path = tmp_path / "prefs.jsonl"
    pair = {"prompt": "Q", "chosen": "a", "rejected": "b", "chosen_reward": 1, "rejected_reward": 0}
    path.write_text(
        json.dumps(pair) + "\n" + json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b", "chosen_reward": 1}) + "\n"
    )
    records = read_records(path)
    parse_preference(records[0], require_rewards=True)
    parse_preference(records[1])  # fine when not required
    with pytest.raises(DataError, match=rf"{path}:2: missing rejected_reward: the rpo_\* losses"):
        parse_preference(records[1], require_rewards=True)


def test_malformed_json_line_is_reported_by_the_loader(tmp_path, tokenizer):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "Q", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    data = DataConfig(train=DatasetConfig(path=str(path)))
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        load_preference_pairs(data.train, data, tokenizer)


# --- tokenization --------------------------------------------------------------------------


def test_targets_cover_the_responses_only(tokenizer):
    prompt = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "EARLIER"},
        {"role": "user", "content": "Q?"},
    ]
    pair = encode_pair(
        tokenizer, parse_preference(rec({"prompt": prompt, "chosen": "GOOD", "rejected": "BAD!"})), None, "x"
    )
    assert targets_text(tokenizer, pair.chosen) == "GOOD</s>"
    assert targets_text(tokenizer, pair.rejected) == "BAD!</s>"
    # Same prompt tokens in front of both responses.
    n_prompt = pair.chosen.target_ids.index(next(t for t in pair.chosen.target_ids if t != IGNORE))
    assert pair.chosen.input_ids[: n_prompt + 1] == pair.rejected.input_ids[: n_prompt + 1]
    assert "EARLIER" in tokenizer.decode(pair.chosen.input_ids)


def write_prefs(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_overlength_keeps_or_drops_a_pair_whole(tmp_path, tokenizer):
    path = write_prefs(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q", "chosen": "short", "rejected": "x" * 200},  # rejected too long
            {"prompt": "Q", "chosen": "short", "rejected": "tiny"},
            {"prompt": "Q" * 200, "chosen": "a", "rejected": "b"},  # prompt fills max_seq_len
        ],
    )
    drop = DataConfig(train=DatasetConfig(path=str(path)), max_seq_len=64, overlength="drop")
    pairs, stats = load_preference_pairs(drop.train, drop, tokenizer)
    assert [p.source for p in pairs] == [f"{path}:2"] and stats.kept == 1 and sum(stats.dropped.values()) == 2

    trunc = drop.model_copy(update={"overlength": "truncate"})
    pairs, stats = load_preference_pairs(trunc.train, trunc, tokenizer)
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:2"] and stats.truncated == 1
    assert len(pairs[0].rejected.input_ids) == 64 and pairs[0].rejected.num_targets > 0
    assert targets_text(tokenizer, pairs[0].chosen) == "short</s>"
    assert stats.dropped == {"prompt fills max_seq_len, no response token left": 1}

    error = drop.model_copy(update={"overlength": "error"})
    with pytest.raises(DataError, match=rf"{path}:1: example has \d+ tokens"):
        load_preference_pairs(error.train, error, tokenizer)


# --- collation and the packed forward ------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tokenizer):
    data = DataConfig(train=DatasetConfig(path="builtin:prefs?n=6&seed=3"), max_seq_len=1024)
    pairs, _ = load_preference_pairs(data.train, data, tokenizer, require_rewards=True)
    return pairs


def test_collate_keeps_pairs_together(pairs, tokenizer):
    """Pairs are packed several to a row (rows as wide as the longest pair); each pair's chosen and
    rejected sequences stay adjacent in one row, positions restarting at each; every per-pair
    tensor follows the packed order, which `order` maps back to the input positions."""
    batch = collate_pairs([pairs[0], None, pairs[1], pairs[2], pairs[3]], tokenizer.pad_token_id)
    order = batch["order"]
    assert sorted(order) == [0, 2, 3, 4] and batch["num_units"] == 4
    given = [pairs[0], None, pairs[1], pairs[2], pairs[3]]
    packed = [given[i] for i in order]
    width = max(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in packed)
    assert batch["input_ids"].shape[1] == width and batch["input_ids"].shape[0] <= 4
    flat = [
        (t, pos)
        for row_ids, row_pos in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist())
        for t, pos in zip(row_ids, row_pos)
    ]
    text = [t for t, _ in flat]
    for pair in packed:  # chosen then rejected, adjacent, found in one row
        seq = pair.chosen.input_ids + pair.rejected.input_ids
        starts = [i for i in range(len(text) - len(seq) + 1) if text[i : i + len(seq)] == seq]
        assert starts and flat[starts[0] + len(pair.chosen.input_ids)][1] == 0
    counts = [n for p in packed for n in (p.chosen.num_targets, p.rejected.num_targets)]
    assert batch["seq_num_targets"].tolist() == counts
    assert batch["seq_index"].tolist() == [i for i, n in enumerate(counts) for _ in range(n)]
    assert batch["chosen_reward_gt"].tolist() == pytest.approx([p.chosen_reward for p in packed])
    assert "reference_chosen_logps" not in batch  # not cached
    assert batch["num_tokens"] == sum(len(e.input_ids) for p in packed for e in (p.chosen, p.rejected))


def test_filler_only_batch_has_no_sequences(tokenizer):
    batch = collate_pairs([None, None], tokenizer.pad_token_id)
    assert batch["num_units"] == 0 and batch["seq_index"].numel() == 0
    assert PAD_SLOT == -1  # the loop maps PAD_SLOT to None before collate


def test_packed_segment_sum_equals_separate_forward_passes(pairs, tokenizer):
    model = tiny_model(tokenizer).eval()
    batch = collate_pairs(pairs[:4], tokenizer.pad_token_id)
    with torch.no_grad():
        packed = policy_logps(model, batch)  # (8,) [c, r] per pair in packed order
        separate = []
        for pair in [pairs[i] for i in batch["order"]]:
            for example in (pair.chosen, pair.rejected):
                ids = torch.tensor([example.input_ids])
                logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
                targets = torch.tensor(example.target_ids)
                keep = targets != IGNORE
                separate.append(logp[keep].gather(1, targets[keep, None]).sum())
    torch.testing.assert_close(packed, torch.stack(separate), rtol=1e-5, atol=1e-4)


def test_cached_reference_logps_collate_in_pair_order(pairs, tokenizer):
    for i, pair in enumerate(pairs):
        pair.reference = (-float(i), -100.0 - i)
    try:
        given = [pairs[3], pairs[1]]
        batch = collate_pairs(given, tokenizer.pad_token_id)
        expected = [given[i].reference for i in batch["order"]]
        assert batch["reference_chosen_logps"].tolist() == [c for c, _ in expected]
        assert batch["reference_rejected_logps"].tolist() == [r for _, r in expected]
    finally:
        for pair in pairs:
            pair.reference = None


# --- KTO: unpaired examples as [own completion | mismatched completion] --------------------


def test_kto_pairs_each_prompt_with_the_next_records_completion(tmp_path, tokenizer):
    from alignkit.data.preference import load_kto_pairs

    path = tmp_path / "kto.jsonl"
    path.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"prompt": "p0", "completion": "c0", "label": True},
                {"prompt": "p1", "completion": "c1", "label": False},
                {"prompt": "p2", "response": "c2", "preference": "chosen"},  # NeMo-Aligner's names
            ]
        )
    )
    cfg = DataConfig(train=DatasetConfig(path=str(path)))
    pairs, stats = load_kto_pairs(cfg.train, cfg, tokenizer)
    assert stats.kept == 3 and [p.label for p in pairs] == [True, False, True]
    assert [targets_text(tokenizer, p.chosen) for p in pairs] == ["c0</s>", "c1</s>", "c2</s>"]
    assert [targets_text(tokenizer, p.rejected) for p in pairs] == ["c1</s>", "c2</s>", "c0</s>"]  # wraps
    assert all(f"p{i}" in tokenizer.decode(p.rejected.input_ids) for i, p in enumerate(pairs))
    batch = collate_pairs([pairs[0], None, pairs[1]], tokenizer.pad_token_id)
    assert batch["kto_label"].tolist() == [[True, None, False][i] for i in batch["order"]]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p", "completion": "c", "label": "yes"}, r"kto.jsonl:1: field 'label' must be true"),
        ({"prompt": "p", "completion": "c"}, r"kto.jsonl:1: missing field 'label'"),
        ({"prompt": "p", "label": True}, r"kto.jsonl:1: missing field\(s\) 'completion'"),
    ],
)
def test_kto_bad_records_are_named(tmp_path, tokenizer, record, message):
    from alignkit.data.preference import load_kto_pairs

    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({"prompt": "q", "completion": "d", "label": True}) + "\n")
    cfg = DataConfig(train=DatasetConfig(path=str(path)))
    with pytest.raises(DataError, match=message):
        load_kto_pairs(cfg.train, cfg, tokenizer)
