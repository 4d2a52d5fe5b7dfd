"""Teacher top-K logits for knowledge distillation: the on-disk cache and the collator.

Offline distillation (NeMo-Aligner's `compute_topk_logits.py`) runs the teacher once and
keeps, for every target position of every example, its K largest logits (sorted in
descending order) and their token ids. One safetensors file per dataset holds

    logits  (M, K) float32   M = target positions over the stored examples
    ids     (M, K) int32
    index   (E,)   int64     which examples (their positions in the dataset list)
    offsets (E+1,) int64     example index[j] owns rows offsets[j]:offsets[j+1], one per
                             target position (target_ids != IGNORE), in position order

and is named by `cache_key`, a hash of everything its content depends on (the teacher, the
tokenized examples, K), so a rerun with the same inputs reuses it and any change makes a
new file. Files are written atomically (a temporary file renamed into place).

Training attaches each example's rows to `Example.extra` and `collate_rows_with_teacher`
concatenates them in exactly the order `logits_at` returns the student's logits: row-major
over the batch's `target_ids != IGNORE` mask, which for a packed row is example after example
and, inside an example, target position after target position.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.config import ModelConfig
from alignkit.data.batching import collate_rows
from alignkit.data.tokenize import Example

__all__ = [
    "TOPK_IDS",
    "TOPK_LOGITS",
    "TopK",
    "attach_topk",
    "cache_key",
    "collate_rows_with_teacher",
    "load_topk",
    "save_topk",
    "teacher_fingerprint",
]

TOPK_LOGITS = "teacher_topk_logits"  # Example.extra and batch key: (n_targets, K) float32
TOPK_IDS = "teacher_topk_ids"  # Example.extra and batch key: (n_targets, K) long
_FORMAT = 1  # bump when the file layout or what is stored changes

TopK = dict[int, tuple[torch.Tensor, torch.Tensor]]  # example index -> ((n, K) logits, (n, K) ids)


def teacher_fingerprint(teacher: ModelConfig, seed: int) -> dict:
    """What identifies the teacher's logits: its config and, for a local model, its files.

    Weight files are identified by name, size and modification time (hashing gigabytes of
    weights on every start would cost more than the cache saves); retraining a teacher into
    the same directory changes the times, so it is not mistaken for the old one.
    """
    # Only what changes the logits: not memory/speed knobs, not the tokenizer (the data is
    # tokenized with the student's, and the vocabularies are checked to be equal).
    spec = teacher.model_dump(mode="json", include={"path", "random_init", "precision"})
    if teacher.path is not None:
        root = Path(teacher.path).resolve()
        spec["path"] = str(root)
        spec["files"] = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.iterdir()
            if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json")
        )
    else:
        spec["seed"] = seed  # a random teacher is a function of its seed
    return spec


def cache_key(teacher: dict, examples: Sequence[Example], top_k: int) -> str:
    """A hash of the teacher fingerprint, K and the examples' token ids and targets.

    Hashing the tokenized examples (not the data path) covers the dataset's content, split
    and limit, the tokenizer, the chat template, max_seq_len and the over-length policy.
    """
    h = hashlib.sha256(json.dumps({"format": _FORMAT, "teacher": teacher, "top_k": top_k}, sort_keys=True).encode())
    h.update(np.asarray([len(examples)], dtype=np.int64).tobytes())
    for e in examples:
        h.update(np.asarray([len(e.input_ids)], dtype=np.int64).tobytes())
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(e.target_ids, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def save_topk(path: str | Path, topk: TopK, metadata: dict[str, str] | None = None) -> None:
    """Write `{example index: ((n, K) logits, (n, K) ids)}` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    index = sorted(topk)
    k = next(iter(topk.values()))[0].shape[1] if topk else 0
    counts = torch.tensor([topk[i][0].shape[0] for i in index], dtype=torch.long)
    tensors = {
        "index": torch.tensor(index, dtype=torch.long),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
        "logits": torch.cat([topk[i][0].float() for i in index]) if index else torch.zeros(0, k),
        # ids < vocabulary size < 2**31: int32 halves the file
        "ids": torch.cat([topk[i][1].to(torch.int32) for i in index]) if index else torch.zeros(0, k, dtype=torch.int32),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a shared cache must be readable
        save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_topk(path: str | Path) -> TopK:
    """Read a file written by `save_topk`; the per-example tensors are views into it."""
    t = load_file(str(path))
    ids = t["ids"].long()
    bounds = t["offsets"].tolist()
    return {
        int(i): (t["logits"][a:b], ids[a:b])
        for i, a, b in zip(t["index"].tolist(), bounds[:-1], bounds[1:])
    }


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
