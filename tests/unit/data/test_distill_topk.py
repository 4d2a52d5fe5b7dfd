"""Teacher top-K storage and collation (alignkit.data.distill) for the distill recipe.

The property everything rests on: row n of the batch's teacher tensors belongs to the n-th
position of `target_ids != IGNORE` in row-major order, the order of the student's logits
from `logits_at`, whatever the packing, the row order and the filler rows.
"""

from __future__ import annotations

import random

import pytest
import torch

from alignkit.data.batching import collate_rows, pack_examples
from alignkit.data.distill import (
    TOPK_IDS,
    TOPK_LOGITS,
    attach_topk,
    collate_rows_with_teacher,
    load_topk,
    save_topk,
)
from alignkit.data.tokenize import IGNORE, Example
from alignkit.models.forward import logits_at
from alignkit.recipes.distill import teacher_topk
from tests.conftest import tiny_model

K = 5


def make_examples(n: int, seed: int = 0, vocab: int = 263) -> list[Example]:
    """Examples of 5-30 tokens whose targets come in one or two separate spans (like chat turns)."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length = rng.randint(5, 30)
        ids = [rng.randrange(7, vocab) for _ in range(length)]
        targets = [IGNORE] * length
        spans = [(length // 3, length // 2), (2 * length // 3, length - 1)] if i % 2 else [(length // 2, length)]
        for a, b in spans:
            for t in range(a, b):
                targets[t] = ids[t + 1] if t + 1 < length else 2
        examples.append(Example(ids, targets, source=f"ex{i}"))
    return examples


def test_collated_teacher_rows_follow_the_target_mask_in_row_major_order():
    examples = make_examples(12)
    # Teacher rows that name their owner: logits[:, 0] = example number * 1000 + position,
    # ids[:, 0] = the target token at that position.
    for i, e in enumerate(examples):
        positions = [t for t, y in enumerate(e.target_ids) if y != IGNORE]
        logits = torch.zeros(len(positions), K)
        logits[:, 0] = torch.tensor([i * 1000.0 + t for t in positions])
        ids = torch.zeros(len(positions), K, dtype=torch.long)
        ids[:, 0] = torch.tensor([e.target_ids[t] for t in positions])
        e.extra[TOPK_LOGITS], e.extra[TOPK_IDS] = logits, ids
    rows = pack_examples(examples, max_seq_len=48)
    assert any(len(r) > 1 for r in rows)  # packing happened
    batch_rows = [rows[2], None, rows[0], rows[1], None]  # shuffled, with loss-free fillers
    batch = collate_rows_with_teacher(batch_rows, pad_id=0, top_k=K)

    select = batch["target_ids"] != IGNORE  # (B, T)
    assert batch[TOPK_LOGITS].shape == (batch["num_units"], K) == (int(select.sum()), K)
    assert torch.equal(batch[TOPK_IDS][:, 0], batch["target_ids"][select])
    # Walk select row-major and name the (example, position) each true entry belongs to.
    owner = {id(e): i for i, e in enumerate(examples)}
    expected = []
    for r, row in enumerate(batch_rows):
        col = 0
        for e in row or []:
            for t in range(len(e.input_ids)):
                if select[r, col + t]:
                    expected.append(owner[id(e)] * 1000.0 + t)
            col += len(e.input_ids)
    assert batch[TOPK_LOGITS][:, 0].tolist() == expected
    # Same token fields as the plain collator.
    plain = collate_rows(batch_rows, pad_id=0)
    assert all(torch.equal(plain[k], batch[k]) for k in ("input_ids", "position_ids", "target_ids"))


def test_collate_of_filler_rows_only_gives_empty_teacher_tensors():
    batch = collate_rows_with_teacher([None, None], pad_id=0, top_k=K)
    assert batch[TOPK_LOGITS].shape == (0, K) and batch[TOPK_IDS].dtype == torch.long


def test_teacher_rows_computed_per_example_match_logits_at_on_the_packed_batch(tokenizer):
    """Offline rows (teacher run on each example alone) == online rows (teacher run on the
    packed micro-batch), position by position: alignment and packing isolation together."""
    teacher = tiny_model(tokenizer, seed=3).eval()
    examples = make_examples(10, seed=1)
    for e in examples:
        alone = collate_rows([[e]], pad_id=0)
        select = alone["target_ids"] != IGNORE
        logits, ids = teacher_topk(teacher, alone, select, K, len(tokenizer), "fp32")
        e.extra[TOPK_LOGITS], e.extra[TOPK_IDS] = logits, ids
    rows = pack_examples(examples, max_seq_len=64)
    assert any(len(r) > 2 for r in rows)
    batch = collate_rows_with_teacher(rows[::-1] + [None], pad_id=0, top_k=K)
    select = batch["target_ids"] != IGNORE
    with torch.no_grad():
        packed = logits_at(teacher, batch["input_ids"], batch["position_ids"], select).float()  # (N, V)
    # Tie-proof comparison: the packed logits at the stored ids are the stored logits, and
    # they are the packed top-K values.
    torch.testing.assert_close(packed.gather(1, batch[TOPK_IDS]), batch[TOPK_LOGITS], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.topk(K, dim=-1).values, batch[TOPK_LOGITS], atol=1e-5, rtol=1e-5)
    assert (batch[TOPK_LOGITS][:, :-1] >= batch[TOPK_LOGITS][:, 1:]).all()  # sorted descending


# --- the cache ----------------------------------------------------------------------------


def test_save_load_round_trip_is_atomic_and_attach_checks_shapes(tmp_path):
    examples = make_examples(5)
    g = torch.Generator().manual_seed(0)
    topk = {
        i: (
            torch.randn(e.num_targets, K, generator=g).sort(descending=True).values,
            torch.randint(0, 263, (e.num_targets, K), generator=g),
        )
        for i, e in enumerate(examples)
    }
    path = tmp_path / "cache" / "train-abc.safetensors"
    save_topk(path, topk, {"teacher": "x"})
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left behind
    loaded = load_topk(path)
    assert loaded.keys() == topk.keys()
    for i in topk:
        assert torch.equal(loaded[i][0], topk[i][0]) and torch.equal(loaded[i][1], topk[i][1])
        assert loaded[i][1].dtype == torch.long
    attach_topk(examples, loaded, K, str(path))
    assert torch.equal(examples[2].extra[TOPK_IDS], topk[2][1])

    with pytest.raises(ValueError, match="expected K=8"):
        attach_topk(make_examples(5), loaded, 8, str(path))
    with pytest.raises(ValueError, match="for 4 examples, the dataset has 5"):
        attach_topk(make_examples(5), {i: loaded[i] for i in range(4)}, K, str(path))
    shifted = make_examples(5)
    shifted[1].target_ids[0] = 9  # one more target token than stored
    with pytest.raises(ValueError, match=r"example 1 \(ex1\)"):
        attach_topk(shifted, loaded, K, str(path))


def test_shards_merge_into_the_same_file_content(tmp_path):
    """What the processes of a torchrun job write (one part each) merges into one full file."""
    topk = {i: (torch.full((i + 1, K), float(i)), torch.full((i + 1, K), i)) for i in range(7)}
    for rank in range(2):
        save_topk(tmp_path / f"part{rank}", {i: v for i, v in topk.items() if i % 2 == rank})
    merged = {}
    for rank in range(2):
        merged.update(load_topk(tmp_path / f"part{rank}"))
    save_topk(tmp_path / "full", merged)
    full = load_topk(tmp_path / "full")
    assert sorted(full) == list(range(7)) and all(torch.equal(full[i][0], topk[i][0]) for i in range(7))
