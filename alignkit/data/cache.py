"""On-disk caches of what a model computes over a tokenized dataset: a distillation teacher's top-K
logits (`distill`), the reference log-probs of DPO (`dpo`).

A cache file is named by `cache_key`, a hash of everything its content depends on: the model
(`model_fingerprint`), the recipe's own spec (a format version, K, ...) and the tokenized examples.
A rerun with the same inputs reuses the file; any change makes a new one. Files are written
atomically (`save_safetensors`: a temporary file renamed into place), so a killed run never leaves
a truncated file that a later run would trust, and readable by the group (shared cache folders).
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
from safetensors.torch import save_file

from alignkit.config import ModelConfig
from alignkit.data.tokenize import Example

__all__ = ["cache_key", "model_fingerprint", "save_safetensors"]


def model_fingerprint(model: ModelConfig, seed: int) -> dict:
    """What identifies a model's outputs: its config and, for a local model, its files.

    Weight files are identified by name, size and modification time (hashing gigabytes of
    weights on every start would cost more than the cache saves); retraining a model into
    the same directory changes the times, so it is not mistaken for the old one.
    """
    # Only what changes the outputs: not memory/speed knobs, not the tokenizer (the data is
    # tokenized with the trained model's, and vocabularies are checked where they can differ).
    spec = model.model_dump(mode="json", include={"path", "random_init", "precision"})
    if model.path is not None:
        root = Path(model.path).resolve()
        spec["path"] = str(root)
        spec["files"] = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.iterdir()
            if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json")
        )
    else:
        spec["seed"] = seed  # a random model is a function of its seed
    return spec


def cache_key(spec: dict, examples: Sequence[Example]) -> str:
    """A hash of `spec` (JSON: the model fingerprint, a format version, ...) and the examples'
    token ids and targets.

    Hashing the tokenized examples (not the data path) covers the dataset's content, split
    and limit, the tokenizer, the chat template, max_seq_len and the over-length policy.
    """
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    h.update(np.asarray([len(examples)], dtype=np.int64).tobytes())
    for e in examples:
        h.update(np.asarray([len(e.input_ids)], dtype=np.int64).tobytes())
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(e.target_ids, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` to `path` atomically (a temporary file in the same folder, renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        # After the write (save_file makes a new file): mkstemp's is private, a shared cache must be readable.
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
