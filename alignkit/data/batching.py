"""Packing, the deterministic batch plan, and collation into model inputs.

Packing: examples are placed into rows of at most `max_seq_len` tokens (best-fit decreasing).
Inside a row every example restarts its position ids at 0; transformers reads the restarts
as sequence boundaries and builds a block-diagonal causal mask, so examples never attend to
each other and no compute goes to padding.

Batch plan: the items (rows or single examples) of step `s` are a pure function of the seed
and `s` (a seeded permutation per epoch), so resuming at step `s` needs no loader state.
A step's global batch is sorted by length and dealt round-robin to the ranks (balancing
tokens), and each rank cuts its share into micro-batches of similar lengths (little padding).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from alignkit.config import ConfigError
from alignkit.data.tokenize import IGNORE, Example

__all__ = ["BatchPlan", "collate_rows", "pack_examples", "PAD_SLOT"]

PAD_SLOT = -1  # an index in a micro-batch that stands for "no item": a loss-free filler row


def pack_indices(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= capacity (best-fit decreasing; an item
    longer than capacity gets a bin of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in order:
        need = lengths[i]
        slot = bisect.bisect_left(free, (need, -1))
        if slot < len(free):
            space, b = free.pop(slot)
            bins[b].append(i)
            bisect.insort(free, (space - need, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - need, len(bins) - 1))
    return bins


def pack_examples(examples: Sequence[Example], max_seq_len: int) -> list[list[Example]]:
    """Group examples into rows of at most max_seq_len tokens (best-fit decreasing)."""
    return [[examples[i] for i in row] for row in pack_indices([len(e.input_ids) for e in examples], max_seq_len)]


def pack_micro_batch(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of variable-length groups packed into as few rows as fit the longest group, row by row."""
    return pack_indices(lengths, max(lengths, default=1))


def collate_groups(groups: Sequence[Sequence[Example] | None], pad_id: int) -> dict[str, Any]:
    """A micro-batch of groups of sequences that must share a row (e.g. the chosen and rejected
    sequences of a preference pair), packed into as few rows as fit the longest group, so the
    padded (B, T) batch wastes little.

    Returns `collate_rows` of the packed rows, plus
        order            the positions in `groups` of the packed groups, in row-major order (the
                         order of their sequences in the batch);
        seq_index        (N,) the sequence of each target position, row-major like `logits_at`
                         with `target_ids != IGNORE` (sequences numbered in packed order);
        seq_num_targets  (S,) target tokens per sequence, in packed order.
    `None` groups (evaluation fillers) are left out; fillers only give one row without sequences.
    """
    present = [i for i, g in enumerate(groups) if g is not None]
    rows = pack_micro_batch([sum(len(e.input_ids) for e in groups[i]) for i in present])
    order = [present[j] for row in rows for j in row]
    batch = collate_rows([[e for j in row for e in groups[present[j]]] for row in rows] or [None], pad_id)
    counts = torch.tensor([e.num_targets for i in order for e in groups[i]], dtype=torch.long)
    batch["order"] = order
    batch["seq_index"] = torch.repeat_interleave(torch.arange(len(counts)), counts)
    batch["seq_num_targets"] = counts
    return batch


class BatchPlan:
    """Which items each rank processes in each micro-batch of each step."""

    def __init__(
        self,
        lengths: Sequence[int],
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
    ):
        per_rank, rest = divmod(global_batch_size, world_size)
        if rest or per_rank % micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} must be a multiple of "
                f"train.micro_batch_size={micro_batch_size} x {world_size} processes"
            )
        if shuffle and len(lengths) < global_batch_size:
            raise ConfigError(
                f"the training set has {len(lengths)} items (rows after packing), fewer than "
                f"train.global_batch_size={global_batch_size}"
            )
        self.lengths = np.asarray(lengths)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch_size

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def global_batch(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
        return order[position * self.global_batch_size : (position + 1) * self.global_batch_size]

    def _share(self, items: np.ndarray) -> list[list[int]]:
        # Longest first, dealt round-robin: ranks get similar token counts and each
        # micro-batch holds items of similar length.
        items = items[np.argsort(-self.lengths[items], kind="stable")]
        mine = items[self.rank :: self.world_size].tolist()
        mb = self.micro_batch_size
        return [mine[i : i + mb] for i in range(0, len(mine), mb)]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of item indices) for optimizer step `step`."""
        return self._share(self.global_batch(step))

    def eval_micro_batches(self) -> list[list[int]]:
        """All items once, split over ranks; every rank gets the same number of micro-batches
        (padded with PAD_SLOT) because sharded forward passes are collectives."""
        n = len(self.lengths)
        chunk = self.micro_batch_size * self.world_size
        padded = np.full(-(-n // chunk) * chunk, PAD_SLOT)
        padded[:n] = np.argsort(-self.lengths, kind="stable")
        mine = padded[self.rank :: self.world_size].tolist()
        return [mine[i : i + self.micro_batch_size] for i in range(0, len(mine), self.micro_batch_size)]


def collate_rows(rows: Sequence[Sequence[Example] | None], pad_id: int) -> dict[str, torch.Tensor | int]:
    """Rows of examples -> `input_ids`, `position_ids`, `target_ids` (B, T), plus the counts
    `num_units` (target tokens: the loss normaliser) and `num_tokens` (real tokens).

    T is the longest row in this micro-batch. A `None` row is a loss-free filler. Padding
    gets its own restarting position ids (a separate "sequence" no real token attends to)
    and no targets.
    """
    width = max((sum(len(e.input_ids) for e in row) for row in rows if row), default=1)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    target_ids = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for example in row or []:
            n = len(example.input_ids)
            input_ids[r, col : col + n] = torch.tensor(example.input_ids)
            target_ids[r, col : col + n] = torch.tensor(example.target_ids)
            position_ids[r, col : col + n] = torch.arange(n)
            col += n
        position_ids[r, col:] = torch.arange(width - col)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "target_ids": target_ids,
        "num_units": int((target_ids != IGNORE).sum()),
        "num_tokens": sum(len(e.input_ids) for row in rows for e in row or []),
    }
