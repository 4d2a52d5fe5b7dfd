"""Activation checkpointing (models/recompute.py): every mode gives the gradients of no
checkpointing, and keeps what the memory plan says it keeps (measured in a process of its own)."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from alignkit.config import GradientCheckpointingConfig, ModelConfig, RandomInitConfig
from alignkit.models.recompute import enable_checkpointing
from alignkit.training.memory_plan import _activations, _arch

MODES = [
    {},
    {"enabled": True},
    {"enabled": True, "mode": "selective"},
    {"enabled": True, "every_n_layers": 2},
    {"enabled": True, "every_n_layers": 2, "mode": "selective"},
    {"enabled": True, "offload": True},
]
SIZES = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160)


def _grads(gc: dict) -> tuple[float, list[torch.Tensor], int]:
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**SIZES, vocab_size=97), attn_implementation="sdpa")
    n = enable_checkpointing(model, GradientCheckpointingConfig(**gc))
    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters()], n


@pytest.mark.parametrize("gc", MODES[1:], ids=lambda gc: "-".join(f"{k}={v}" for k, v in gc.items()))
def test_every_mode_gives_the_gradients_of_none(gc):
    loss, grads, checkpointed = _grads({})
    loss2, grads2, checkpointed2 = _grads(gc)
    assert checkpointed == 0 and checkpointed2 == (2 if gc.get("every_n_layers") == 2 else 4)
    assert loss2 == loss
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, grads2))


def test_true_in_yaml_is_every_layer_recomputed_whole():
    cfg = ModelConfig(random_init=RandomInitConfig(), gradient_checkpointing=True)
    assert cfg.gradient_checkpointing == GradientCheckpointingConfig(enabled=True)
    assert ModelConfig(random_init=RandomInitConfig()).gradient_checkpointing.enabled is False


def test_the_skipped_layers_are_off():
    model = LlamaForCausalLM._from_config(LlamaConfig(**SIZES, vocab_size=97))
    enable_checkpointing(model, GradientCheckpointingConfig(enabled=True, every_n_layers=3))
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, False, True]


_MEASURE = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from alignkit.config import GradientCheckpointingConfig
from alignkit.models.recompute import enable_checkpointing
torch.set_num_threads(1)
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
sizes, b, s = json.loads(sys.argv[1]), 4, 256
out = []
for gc in json.loads(sys.argv[2]):
    model = LlamaForCausalLM._from_config(LlamaConfig(**sizes), attn_implementation="sdpa")
    enable_checkpointing(model, GradientCheckpointingConfig(**gc))
    ids = torch.randint(0, sizes["vocab_size"], (b, s))
    kept = []
    for _ in range(3):  # the least of three: RSS only ever gains noise (a stray page, an allocator cache)
        before = rss()
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # no head: the layers alone
        kept.append(rss() - before - hidden.nbytes)
        del hidden
    out.append(min(kept))
print(json.dumps(out))
"""


def test_what_each_mode_keeps_is_what_the_plan_counts():
    """The resident memory a forward adds (allocations mmap'd and returned at free, so exact), per
    decoder layer: the difference between a 4-layer and a 2-layer model, halved (what is kept once,
    the embeddings, the final norm, is not the plan's per-layer count), against the plan's per-token
    elements x 4 bytes without the one layer it adds for backward's recompute. Measured per layer:
    none 9.4 MB, selective 5.4, every second layer 4.8, full 0.5 (plan 10.9, 5.5, 5.8, 0.5: for
    GQA the plan counts k and v repeated to every head, as eager attention keeps them; sdpa does not)."""
    sizes = {**SIZES, "hidden_size": 128, "num_attention_heads": 8, "intermediate_size": 320, "vocab_size": 97}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    measured = {}
    for layers in (4, 2):
        result = subprocess.run(
            [sys.executable, "-c", _MEASURE, json.dumps({**sizes, "num_hidden_layers": layers}), json.dumps(MODES[:4])],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        measured[layers] = json.loads(result.stdout)
    per_layer = [(a - b) / 2 for a, b in zip(measured[4], measured[2])]
    arch = _arch(LlamaConfig(**{**sizes, "num_hidden_layers": 4}))
    for gc, got in zip(MODES[:4], per_layer):
        cfg = GradientCheckpointingConfig(**gc)
        two = _activations(replace(arch, layers=2), cfg, 1)  # the same recompute term: it cancels
        planned = (_activations(arch, cfg, 1) - two) / 2 * 1024 * 4
        assert 0.8 < got / planned < 1.15, (gc, got, planned)
    none, full, selective, every_2 = per_layer
    assert full < 0.1 * none and full < selective < 0.6 * none and full < every_2 < 0.6 * none
