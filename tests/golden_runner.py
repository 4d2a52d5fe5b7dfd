"""Run every shipped `tiny` config for its first few steps in one process (one import, one thread)
and write the metrics each run logged: `python -m tests.golden_runner OUT_DIR` -> OUT_DIR/golden.json.
Used by tests/recipes/test_golden.py; the overrides only shorten the runs and skip what the pinned
curves do not need (validation, checkpoints, final/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from alignkit.config import find_config, load_config
from alignkit.recipes import recipe_module

COMMON = ["checkpoint.every=null", "checkpoint.save_final=false", "logging.progress=none", "logging.tensorboard=false"]
SHORT = {
    "sft/tiny": ["train.max_steps=3", "train.eval_every=null"],
    "distill/tiny": ["train.max_steps=3", "train.eval_every=null"],
    "dpo/tiny": ["train.max_steps=3", "train.eval_every=null"],
    "reward_model/tiny": [
        "train.max_steps=3",
        "train.eval_every=null",
        "normalization_samples=0",
        "data.validation=null",
    ],
    "reward_model/tiny_regression": [
        "train.max_steps=3",
        "train.eval_every=null",
        "normalization_samples=0",
        "data.validation=null",
    ],
    "steerlm/tiny": ["train.max_steps=3", "train.eval_every=null"],
    "rejection_sampling/tiny": ["rs.iterations=1", "train.epochs=1"],
    "ppo/tiny": ["ppo.steps=2"],
    "reinforce/tiny": ["reinforce.steps=2"],
    "draftp/tiny": ["draftp.steps=2"],
}


def main(out_root: Path) -> None:
    torch.set_num_threads(1)  # the same reduction order on every machine of this kind
    logged = {}
    for name, overrides in SHORT.items():
        recipe, config = name.split("/")
        module = recipe_module(recipe)
        out = out_root / name.replace("/", "_")
        module.main(load_config(module.Config, find_config(recipe, config), [f"output_dir={out}", *COMMON, *overrides]))
        logged[name] = [
            json.loads(line) for f in sorted(out.rglob("metrics.jsonl")) for line in f.read_text().splitlines()
        ]
    (out_root / "golden.json").write_text(json.dumps(logged))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
