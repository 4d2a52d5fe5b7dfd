"""The task world's datasets written as the JSONL files recipes read: `alignkit build-data`.

    alignkit build-data --out data/taskworld --seed 0

One file per entry of `alignkit.tasks.datasets.dataset_builders` (pretrain, sft, prefs, attributes,
kto, prompts, held-out evaluation and red-team prompts, with validation files), and manifest.json
with the seed, the sizes, the record counts and the oracle's settings. See docs/task-world.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from alignkit.data.io import write_jsonl
from alignkit.tasks.datasets import KTO_DESIRABLE_REWARD, DatasetSizes, dataset_builders
from alignkit.tasks.oracle import REWARD_WEIGHTS

__all__ = ["build_datasets"]


def build_datasets(out_dir: str | Path, seed: int = 0, sizes: DatasetSizes | None = None) -> dict[str, Path]:
    """Write every task-world dataset to `out_dir` (`sizes`: default DatasetSizes()); returns {name: path},
    manifest.json included."""
    sizes = sizes or DatasetSizes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths, counts = {}, {}
    for name, build in dataset_builders(seed, sizes).items():
        records = build()
        paths[name] = write_jsonl(records, out / f"{name}.jsonl")
        counts[name] = len(records)
    manifest = {
        "seed": seed,
        "sizes": asdict(sizes),
        "counts": counts,
        "reward_weights": REWARD_WEIGHTS,
        "kto_desirable_reward": KTO_DESIRABLE_REWARD,
        "seconds": round(time.perf_counter() - start, 2),
    }
    paths["manifest"] = out / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths
