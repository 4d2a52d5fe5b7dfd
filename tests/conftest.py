"""Shared fixtures: the project's own byte tokenizer and tiny random models (no downloads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.config import ModelConfig, RandomInitConfig
from alignkit.models.loading import load_causal_lm
from alignkit.models.tokenizer import byte_tokenizer

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test` runs two workers) each worker computes on one thread, so two
# workers fill two cores without oversubscribing them; a single pytest process uses up to two.
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


def tiny_model(tokenizer, architecture="llama", seed=0, **overrides):
    cfg = ModelConfig(
        random_init=RandomInitConfig(
            architecture=architecture,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            **overrides,
        )
    )
    return load_causal_lm(cfg, tokenizer, seed=seed)


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m alignkit.cli ARGS`, returning the completed process (output captured)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "alignkit.cli", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def run_recipe(
    recipe: str,
    out,
    *overrides: str,
    ok: bool = True,
    env: dict | None = None,
    nproc: int | None = None,
    config: str = "tiny",
) -> subprocess.CompletedProcess:
    """`alignkit run RECIPE --config CONFIG output_dir=OUT [--nproc N]` quietly on one thread per process;
    asserts success unless `ok=False`."""
    launch = ["--nproc", str(nproc)] if nproc else []
    result = run_cli(
        "run",
        recipe,
        "--config",
        config,
        f"output_dir={out}",
        *launch,
        "logging.progress=none",
        *overrides,
        env={"OMP_NUM_THREADS": "1", **(env or {})},
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def read_metrics(out) -> list[dict]:
    """The lines of OUT/metrics.jsonl."""
    import json

    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
