"""Teacher top-K logits for knowledge distillation: the on-disk cache and the collator.

Offline distillation (NeMo-Aligner's `compute_topk_logits.py`) runs the teacher once and
keeps, for every target position of every example, its K largest logits (sorted in
descending order) and their token ids. One safetensors file per dataset holds

    logits  (M, K) float32   M = target positions over the stored examples
    ids     (M, K) int32
    index   (E,)   int64     which examples (their positions in the dataset list)
    offsets (E+1,) int64     example index[j] owns rows offsets[j]:offsets[j+1], one per
                             target position (target_ids != IGNORE), in position order

and is named by `alignkit.data.cache.cache_key` of `topk_cache_spec` (the teacher, K) and the
tokenized examples, so a rerun with the same inputs reuses it and any change makes a new file.
Files are written atomically (`alignkit.data.cache.save_safetensors`).

Training attaches each example's rows to `Example.extra` and `collate_rows_with_teacher`
concatenates them in exactly the order `logits_at` returns the student's logits: row-major
over the batch's `target_ids != IGNORE` mask, which for a packed row is example after example
and, inside an example, target position after target position.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from alignkit.data.batching import collate_rows
from alignkit.data.cache import save_safetensors
from alignkit.data.tokenize import Example

__all__ = [
    "TOPK_IDS",
    "TOPK_LOGITS",
    "TopK",
    "attach_topk",
    "collate_rows_with_teacher",
    "load_topk",
    "save_topk",
    "topk_cache_spec",
]

TOPK_LOGITS = "teacher_topk_logits"  # Example.extra and batch key: (n_targets, K) float32
TOPK_IDS = "teacher_topk_ids"  # Example.extra and batch key: (n_targets, K) long
_FORMAT = 1  # bump when the file layout or what is stored changes

TopK = dict[int, tuple[torch.Tensor, torch.Tensor]]  # example index -> ((n, K) logits, (n, K) ids)


def topk_cache_spec(teacher: dict, top_k: int) -> dict:
    """What a top-K file depends on besides the examples (`cache_key`): the teacher's
    `model_fingerprint`, K and the file layout's version."""
    return {"format": _FORMAT, "teacher": teacher, "top_k": top_k}


def save_topk(path: str | Path, topk: TopK, metadata: dict[str, str] | None = None) -> None:
    """Write `{example index: ((n, K) logits, (n, K) ids)}` to `path` atomically."""
    index = sorted(topk)
    k = next(iter(topk.values()))[0].shape[1] if topk else 0
    counts = torch.tensor([topk[i][0].shape[0] for i in index], dtype=torch.long)
    tensors = {
        "index": torch.tensor(index, dtype=torch.long),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
        "logits": torch.cat([topk[i][0].float() for i in index]) if index else torch.zeros(0, k),
        # ids < vocabulary size < 2**31: int32 halves the file
        "ids": (
            torch.cat([topk[i][1].to(torch.int32) for i in index]) if index else torch.zeros(0, k, dtype=torch.int32)
        ),
    }
    save_safetensors(path, tensors, metadata)


def load_topk(path: str | Path) -> TopK:
    """Read a file written by `save_topk`; the per-example tensors are views into it."""
    t = load_file(str(path))
    ids = t["ids"].long()
    bounds = t["offsets"].tolist()
    return {int(i): (t["logits"][a:b], ids[a:b]) for i, a, b in zip(t["index"].tolist(), bounds[:-1], bounds[1:])}


def attach_topk(examples: Sequence[Example], topk: TopK, top_k: int, where: str) -> None:
    """Store each example's teacher rows in `example.extra`, checking they belong together."""
    if sorted(topk) != list(range(len(examples))):
        raise ValueError(f"{where}: holds teacher top-K for {len(topk)} examples, the dataset has {len(examples)}")
    for i, e in enumerate(examples):
        logits, ids = topk[i]
        if logits.shape != (e.num_targets, top_k):
            raise ValueError(
                f"{where}: example {i} ({e.source}) has {e.num_targets} target tokens but "
                f"{tuple(logits.shape)} stored teacher logits (expected K={top_k}); delete the file to recompute it"
            )
        e.extra[TOPK_LOGITS], e.extra[TOPK_IDS] = logits, ids


def collate_rows_with_teacher(
    rows: Sequence[Sequence[Example] | None], pad_id: int, top_k: int
) -> dict[str, torch.Tensor | int]:
    """`collate_rows` plus `teacher_topk_logits` (N, K) and `teacher_topk_ids` (N, K).

    Row n of the teacher tensors belongs to the n-th true entry of `target_ids != IGNORE`
    in row-major order: `collate_rows` lays each row's examples left to right, so walking
    the rows, then their examples, then each example's targets visits the same positions
    in the same order. Filler rows (None) and padding have no targets and add no rows.
    """
    batch = collate_rows(rows, pad_id)
    examples = [e for row in rows for e in row or []]
    logits = [e.extra[TOPK_LOGITS] for e in examples]
    ids = [e.extra[TOPK_IDS] for e in examples]
    batch[TOPK_LOGITS] = torch.cat(logits) if logits else torch.zeros(0, top_k)  # (N, K)
    batch[TOPK_IDS] = torch.cat(ids) if ids else torch.zeros(0, top_k, dtype=torch.long)  # (N, K)
    return batch
