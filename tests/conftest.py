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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


def tiny_model(tokenizer, architecture="llama", seed=0, **overrides):
    cfg = ModelConfig(random_init=RandomInitConfig(architecture=architecture, hidden_size=32, num_layers=2,
                                                   num_heads=4, num_kv_heads=2, intermediate_size=64, **overrides))
    return load_causal_lm(cfg, tokenizer, seed=seed)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m alignkit.cli ARGS`, returning the completed process (output captured)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "alignkit.cli", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)
