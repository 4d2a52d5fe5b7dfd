"""Resumable checkpoints: `output_dir/checkpoints/step_N/`.

A checkpoint holds the full (unsharded) model and optimizer state, the scheduler, the step
(which fixes the data-loader position, since batches are a pure function of seed and step)
and every rank's RNG states. It is written into a temporary directory that rank 0 renames
into place only when every file is on disk, so a run killed mid-save leaves either the
previous checkpoint or the new one, never half of one. The newest `keep_last` are kept.

Ranks load from a shared filesystem (every rank reads the file; `set_state_dict` re-shards).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alignkit.models.loading import unwrap
from alignkit.training.distributed import Dist, barrier, full_state_dict

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_STEP_DIR = re.compile(r"^step_(\d+)$")
_COMPLETE = "COMPLETE"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    steps = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / _COMPLETE).is_file()
    ]
    return max(steps)[1] if steps else None


def save_checkpoint(
    checkpoints_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    d: Dist,
    keep_last: int,
    extra: dict[str, Any] | None = None,
    trainable_only: bool = False,
) -> Path:
    """Write `step_{step}/` atomically; a collective, every rank calls it. `trainable_only`: leave
    out frozen parameters (they are restored from where the run loaded them)."""
    root = Path(checkpoints_dir)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    model_state, optim_state = full_state_dict(model, optimizer, trainable_only)
    if d.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(d)
    if d.is_main:
        torch.save(
            {
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": scheduler.state_dict(),
                "step": step,
                "extra": extra or {},
            },
            tmp / "state.pt",
        )
    torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    barrier(d)
    if d.is_main:
        (tmp / _COMPLETE).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep_last)
    barrier(d)
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    d: Dist,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns `{"step": N, "extra": ...}`."""
    # local: torch.distributed.checkpoint costs ~0.6 s of start-up; only resuming needs it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    set_state_dict(
        unwrap(model),
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=not trainable_only),
    )
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng_rank{d.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return {"step": state["step"], "extra": state["extra"]}


# --- several models trained together (PPO's actor and critic) -----------------------------------

Part = tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]


def save_checkpoints(
    checkpoints_dir: str | Path,
    step: int,
    parts: dict[str, Part],
    d: Dist,
    keep_last: int,
    extra: dict[str, Any] | None = None,
    trainable_only: bool = False,
) -> Path:
    """The first part at `checkpoints/step_N`, every other part at `checkpoints/<name>/step_N`.
    The first is written last, so its completeness marks a complete set (resume looks for it)."""
    root = Path(checkpoints_dir)
    (first, first_part), *others = parts.items()
    for name, (model, optimizer, scheduler) in others:
        save_checkpoint(root / name, step, model, optimizer, scheduler, d, keep_last, trainable_only=trainable_only)
    return save_checkpoint(root, step, *first_part, d, keep_last, extra=extra, trainable_only=trainable_only)


def load_checkpoints(path: str | Path, parts: dict[str, Part], d: Dist, trainable_only: bool = False) -> dict[str, Any]:
    """Restore a set written by `save_checkpoints`, given the first part's `step_N` directory."""
    path = Path(path)
    (first, first_part), *others = parts.items()
    for name, part in others:
        load_checkpoint(path.parent / name / path.name, *part, d, trainable_only)
    return load_checkpoint(path, *first_part, d, trainable_only)
