"""The on-disk cache utilities (alignkit.data.cache) that the distill and dpo recipes share: a key
that changes with everything the cached content depends on, and an atomic safetensors write."""

from __future__ import annotations

import os
import random
import stat

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import ModelConfig, RandomInitConfig
from alignkit.data.cache import cache_key, model_fingerprint, save_safetensors
from alignkit.data.distill import topk_cache_spec
from alignkit.data.tokenize import IGNORE, Example


def make_examples(n: int, seed: int = 0, vocab: int = 263) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length = rng.randint(5, 30)
        ids = [rng.randrange(7, vocab) for _ in range(length)]
        targets = [IGNORE] * (length // 2) + ids[length // 2 + 1 :] + [2]
        examples.append(Example(ids, targets, source=f"ex{i}"))
    return examples


def random_model(**kw) -> ModelConfig:
    return ModelConfig(random_init=RandomInitConfig(**kw))


def fake_model_dir(path):
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"0" * 16)
    (path / "tokenizer.json").write_text("{}")
    return path


def key(model: dict, examples, top_k: int = 8) -> str:
    return cache_key(topk_cache_spec(model, top_k), examples)


def test_cache_key_is_stable_for_equal_inputs_and_changes_with_each_input():
    model = model_fingerprint(random_model(), seed=1)
    base = key(model, make_examples(6))
    assert key(model_fingerprint(random_model(), seed=1), make_examples(6)) == base  # rebuilt, same

    one_token = make_examples(6)
    one_token[3].input_ids[0] += 1
    one_mask = make_examples(6)
    one_mask[0].target_ids[0] = 5
    changed = {
        "top_k": key(model, make_examples(6), 16),
        "another recipe's spec": cache_key({"format": "dpo-reference-logps-1", "reference": model}, make_examples(6)),
        "a token": key(model, one_token),
        "a target": key(model, one_mask),
        "one example fewer (data.limit)": key(model, make_examples(6)[:5]),
        "model seed": key(model_fingerprint(random_model(), seed=2), make_examples(6)),
        "model shape": key(model_fingerprint(random_model(hidden_size=32), seed=1), make_examples(6)),
        "model precision": key(
            model_fingerprint(ModelConfig(random_init=RandomInitConfig(), precision="bf16"), seed=1), make_examples(6)
        ),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed

    # Knobs that do not change the outputs do not invalidate the cache.
    same = ModelConfig(random_init=RandomInitConfig(), gradient_checkpointing=True, attn_implementation="eager")
    assert key(model_fingerprint(same, seed=1), make_examples(6)) == base


def test_cache_key_of_a_local_model_follows_its_weight_files(tmp_path):
    model_dir = fake_model_dir(tmp_path / "model")
    cfg = ModelConfig(path=str(model_dir))
    base = key(model_fingerprint(cfg, seed=1), make_examples(3))
    assert key(model_fingerprint(cfg, seed=99), make_examples(3)) == base  # seed only for random init
    (model_dir / "tokenizer.json").write_text('{"x": 1}')  # not weights
    assert key(model_fingerprint(cfg, seed=1), make_examples(3)) == base
    st = (model_dir / "model.safetensors").stat()
    os.utime(model_dir / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # retrained
    assert key(model_fingerprint(cfg, seed=1), make_examples(3)) != base
    other = fake_model_dir(tmp_path / "other")
    assert key(model_fingerprint(ModelConfig(path=str(other)), seed=1), make_examples(3)) != base


def test_save_safetensors_is_atomic_and_readable_by_others(tmp_path):
    path = tmp_path / "cache" / "train-abc.safetensors"
    tensors = {"logps": torch.arange(6, dtype=torch.float64).reshape(3, 2).t()}  # not contiguous
    save_safetensors(path, tensors, {"reference": "x"})
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left behind
    assert torch.equal(load_file(str(path))["logps"], tensors["logps"])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0o600

    with pytest.raises(AttributeError):  # a failed write leaves the old file and no temporary
        save_safetensors(path, {"bad": "not a tensor"})
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert torch.equal(load_file(str(path))["logps"], tensors["logps"])
