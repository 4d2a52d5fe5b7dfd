"""Resumable checkpoints: `output_dir/checkpoints/step_N/`, written by every rank in parallel.

A checkpoint is a `torch.distributed.checkpoint` (DCP) directory: each rank writes the shards it
holds (`__<rank>_0.distcp`) and rank 0 the metadata, so no rank ever gathers the model or the
optimizer state. It holds, for each trained part of the recipe (`model`, or PPO's `actor` and
`critic`), the model and optimizer state keyed by parameter name, so it loads on any number of
ranks and any mesh (DCP reshards while reading); `trainer_state.pt` with each part's schedule,
the step (which fixes the data position: batches are a pure function of seed and step) and the
recipe's extra state; every rank's RNG states; and `hf/<part>/`, each part's Hugging Face config,
for `alignkit export`.

Atomic: the files go into `.step_N.tmp/`, which rank 0 marks COMPLETE and renames into place only
when every rank's shards are on disk; a run killed while saving resumes from the previous one.
With `checkpoint.async_save` the state is copied to host memory and written by a background
thread while training goes on; the save is completed (marked and renamed) as soon as it is done,
and at the latest before the next save or at the last step.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from alignkit.config import ConfigError, ModelConfig
from alignkit.models.loading import hf_class, load_tokenizer, save_hf_streamed, saved_weight_names, unwrap
from alignkit.training.distributed import Dist, barrier

__all__ = [
    "Part",
    "export_checkpoint",
    "latest_checkpoint",
    "load_checkpoints",
    "model_tensors",
    "poll_checkpoint",
    "read_model_state",
    "save_checkpoints",
    "wait_for_checkpoint",
]

Part = tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]

_STEP_DIR = re.compile(r"^step_(\d+)$")
_COMPLETE = "COMPLETE"
_TRAINER_STATE = "trainer_state.pt"
# DCP warns at every save and load of a one-process run that it assumes one process: it does, on
# purpose (`no_dist`). A filter, not a context: an asynchronous save warns from its own thread.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")


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


def _options(trainable_only: bool):
    # local: torch.distributed.checkpoint costs ~0.6 s of start-up; only checkpointing needs it
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _sharded_state(parts: dict[str, Part], trainable_only: bool) -> dict[str, Any]:
    """{part: {"model": ..., "optim": ...}}: each rank's own shards (DTensors under FSDP/TP, plain
    tensors on one process), keyed by parameter name whatever the mesh."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    options = _options(trainable_only)
    state = {}
    for name, (model, optimizer, _) in parts.items():
        model_state, optim_state = get_state_dict(unwrap(model), optimizer, options=options)
        state[name] = {"model": model_state, "optim": optim_state}
    return state


# --- saving -------------------------------------------------------------------------------------


@dataclass
class _Pending:
    """An asynchronous save in flight: completed by rank 0 once its future is done."""

    future: Future
    tmp: Path
    final: Path
    keep_last: int


# One save at most is in flight per process (a second waits for the first); the process group of
# the background writes is made once, by every rank at its first asynchronous save.
_pending: _Pending | None = None
_async_group = None


def save_checkpoints(
    checkpoints_dir: str | Path,
    step: int,
    parts: dict[str, Part],
    d: Dist,
    keep_last: int,
    extra: dict[str, Any] | None = None,
    trainable_only: bool = False,
    async_save: bool = False,
) -> Path:
    """Write `step_{step}/` for every part; a collective, every rank calls it. `trainable_only`:
    leave out frozen parameters (they are restored from where the run loaded them). Returns the
    directory, which exists once the save is complete (at once unless `async_save`)."""
    import torch.distributed.checkpoint as dcp

    global _pending, _async_group
    wait_for_checkpoint(d)
    root = Path(checkpoints_dir)
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainer = {
            "step": step,
            "extra": extra or {},
            "parts": list(parts),
            "schedulers": {n: s.state_dict() for n, (*_, s) in parts.items()},
        }
        torch.save(trainer, tmp / _TRAINER_STATE)
        _save_hf_configs(parts, tmp / "hf", trainable_only)
    barrier(d)  # tmp exists before any rank writes into it
    torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    state = _sharded_state(parts, trainable_only)
    if async_save:
        if d.enabled and _async_group is None:
            # its own gloo group: the background thread's collectives must not interleave with
            # the training thread's, and DCP stages through host memory (also under NCCL)
            _async_group = dist.new_group(backend="gloo")
        future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=_async_group, no_dist=not d.enabled)
        _pending = _Pending(future, tmp, final, keep_last)
        return final
    dcp.save(state, checkpoint_id=str(tmp), no_dist=not d.enabled)
    barrier(d)
    _kill_if_testing("ALIGNKIT_TEST_KILL_IN_SAVE", step)
    if d.is_main:
        _complete(tmp, final, keep_last)
    barrier(d)
    return final


def _save_hf_configs(parts: dict[str, Part], directory: Path, trainable_only: bool) -> None:
    """Each part's HF config (and generation config), for `export`: a checkpoint of full weights
    becomes a Hugging Face directory without the run's code. Adapter-only checkpoints have none."""
    if trainable_only:
        return
    for name, (model, *_) in parts.items():
        hf_model = unwrap(model)
        if hasattr(hf_model, "peft_config") or not hasattr(hf_model, "config"):
            continue
        config = hf_model.config.__class__.from_dict(hf_model.config.to_dict())
        config.architectures = [hf_class(hf_model).__name__]
        config.save_pretrained(directory / name)
        if hf_model.can_generate() and getattr(hf_model, "generation_config", None) is not None:
            hf_model.generation_config.save_pretrained(directory / name)


def _complete(tmp: Path, final: Path, keep_last: int) -> None:
    """Rank 0, once every rank's files are in `tmp`: mark, rename into place, prune."""
    (tmp / _COMPLETE).write_text(f"{final.name}\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(final.parent, keep_last)


def poll_checkpoint(d: Dist) -> None:
    """Complete an asynchronous save whose writes are done; never waits. Rank 0's future is done
    only after it wrote the metadata, which DCP writes after every rank reported its shards
    written, so rank 0 completes the checkpoint without asking the others."""
    global _pending
    if _pending is None or not _pending.future.done():
        return
    pending, _pending = _pending, None
    pending.future.result()  # raises a failed write here, on the rank that failed
    if d.is_main:
        _kill_if_testing("ALIGNKIT_TEST_KILL_IN_SAVE", int(pending.final.name[5:]))
        _complete(pending.tmp, pending.final, pending.keep_last)


def wait_for_checkpoint(d: Dist) -> None:
    """Wait for an asynchronous save in flight and complete it (before the next save, and at the
    end of a run: the process must not exit with a checkpoint half written)."""
    if _pending is not None:
        _pending.future.result()
        poll_checkpoint(d)


def _kill_if_testing(variable: str, step: int) -> None:
    """Fault injection for the atomicity tests: SIGKILL after the shards are written but before
    the checkpoint is marked complete."""
    if os.environ.get(variable) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)


# --- loading ------------------------------------------------------------------------------------


def load_checkpoints(path: str | Path, parts: dict[str, Part], d: Dist, trainable_only: bool = False) -> dict[str, Any]:
    """Restore every part from `step_N/` (saved on any number of ranks); returns
    `{"step": N, "extra": ...}`. A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not (path / ".metadata").is_file():  # before DCP: one state.pt gathered on rank 0
        raise ConfigError(
            f"{path} was written by an older alignkit (no sharded checkpoint in it): resume it with that version, "
            "or start over with checkpoint.resume=false"
        )
    state = _sharded_state(parts, trainable_only)  # this run's shapes and placements: DCP fills them
    dcp.load(state, checkpoint_id=str(path), no_dist=not d.enabled)
    for name, (model, optimizer, _) in parts.items():
        set_state_dict(
            unwrap(model),
            optimizer,
            model_state_dict=state[name]["model"],
            optim_state_dict=state[name]["optim"],
            options=_options(trainable_only),
        )
    trainer = torch.load(path / _TRAINER_STATE, weights_only=False)
    for name, (*_, scheduler) in parts.items():
        scheduler.load_state_dict(trainer["schedulers"][name])
    # A rank that did not exist when the checkpoint was saved (resumed on more ranks) keeps its
    # seeded RNG: batches and sampling seeds are functions of the step, not of these states.
    rng_file = path / f"rng_rank{d.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return {"step": trainer["step"], "extra": trainer["extra"]}


def model_tensors(path: str | Path, part: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """The model tensors of `part` in checkpoint `path`: name -> (full shape, dtype), from the metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = f"{part}.model."
    metadata = FileSystemReader(str(path)).read_metadata()
    return {
        key[len(prefix) :]: (meta.size, meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }


def read_model_state(path: str | Path, part: str, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Full tensors of `part`'s model from checkpoint `path` in this process (no process group),
    all of them or only `names`: a reader holds what it asks for, one tensor at a time if it likes."""
    import torch.distributed.checkpoint as dcp

    shapes = model_tensors(path, part)
    wanted = list(shapes) if names is None else names
    tensors = {name: torch.empty(shapes[name][0], dtype=shapes[name][1]) for name in wanted}
    dcp.load({part: {"model": tensors}}, checkpoint_id=str(path), no_dist=True)
    return tensors


# --- export -------------------------------------------------------------------------------------


def export_checkpoint(path: str | Path, out_dir: str | Path, part: str | None = None) -> Path:
    """`alignkit export`: the model of `part` (default the first: `model`, or PPO's `actor`) in
    checkpoint `path` as a Hugging Face directory, read and written one tensor at a time in this
    process, on any machine that sees the files. The tokenizer (and a `data.chat_template`) come
    from the run's config.yaml, two levels up."""
    import transformers
    from transformers import AutoConfig, GenerationConfig

    path = Path(path)
    if not (path / _COMPLETE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {_COMPLETE} file)")
    trainer = torch.load(path / _TRAINER_STATE, weights_only=False)
    part = part or trainer["parts"][0]
    if part not in trainer["parts"]:
        raise ConfigError(f"{path} holds {', '.join(trainer['parts'])}, not {part!r}")
    hf_dir = path / "hf" / part
    if not hf_dir.is_dir():
        raise ConfigError(f"{path} holds only the trainable parameters of {part} (LoRA adapters): nothing to export")
    run_config = path.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise FileNotFoundError(f"{run_config} not found: the run's config names the tokenizer")
    run = yaml.safe_load(run_config.read_text())
    tokenizer = load_tokenizer(ModelConfig.model_validate(run["model"]))
    if (run.get("data") or {}).get("chat_template") is not None:
        tokenizer.chat_template = run["data"]["chat_template"]

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        skeleton = getattr(transformers, config.architectures[0])._from_config(config)
    skeleton.tie_weights()
    if (hf_dir / "generation_config.json").is_file():
        skeleton.generation_config = GenerationConfig.from_pretrained(hf_dir)
    names = saved_weight_names(skeleton)
    if names is None:
        raise ConfigError(f"{config.architectures[0]}: transformers converts its weights on saving; not exportable")
    specs = model_tensors(path, part)
    return save_hf_streamed(
        skeleton, {n: specs[n] for n in names}, lambda n: read_model_state(path, part, [n])[n], tokenizer, out_dir
    )
