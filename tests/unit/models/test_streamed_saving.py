"""`save_hf_streamed` (final/ written one tensor at a time) writes what `save_pretrained` writes:
the same config, generation config and weights, tied copies left out, and sharded files that
`from_pretrained` reads."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.config import ModelConfig, RandomInitConfig
from alignkit.models.loading import (
    load_causal_lm,
    load_sequence_scorer,
    load_tokenizer,
    meta_skeleton,
    save_causal_lm,
    save_hf_streamed,
    saved_weight_names,
)


def streamed(model, tokenizer, out, max_shard_bytes=5 * 10**9):
    skeleton, state = meta_skeleton(model), model.state_dict()
    specs = {n: (state[n].shape, state[n].dtype) for n in saved_weight_names(skeleton)}
    return save_hf_streamed(skeleton, specs, state.__getitem__, tokenizer, out, max_shard_bytes=max_shard_bytes)


@pytest.mark.parametrize(
    ("architecture", "tied", "head"), [("llama", False, "lm"), ("gpt2", True, "lm"), ("qwen2", True, "score")]
)
def test_streamed_equals_save_pretrained(tmp_path, architecture, tied, head):
    cfg = ModelConfig(
        random_init=RandomInitConfig(
            architecture=architecture,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            tie_word_embeddings=tied,
        )
    )
    tokenizer = load_tokenizer(cfg)
    if head == "lm":
        model, auto_class = load_causal_lm(cfg, tokenizer), AutoModelForCausalLM
    else:
        model, auto_class = load_sequence_scorer(cfg, tokenizer, 2), AutoModelForSequenceClassification
    reference = save_causal_lm(model, model.state_dict(), tokenizer, tmp_path / "reference", auto_class=auto_class)
    ours = streamed(model, tokenizer, tmp_path / "ours")
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in reference.iterdir())
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        if (reference / name).is_file():
            assert json.loads((ours / name).read_text()) == json.loads((reference / name).read_text()), name
    a, b = load_file(reference / "model.safetensors"), load_file(ours / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if tied:
        assert "lm_head.weight" not in b

    sharded = streamed(model, tokenizer, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and index["weight_map"].keys() == b.keys()
    loaded = auto_class.from_pretrained(sharded)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
