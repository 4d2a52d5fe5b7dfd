"""models/loading.py on what the project saves: a saved directory loads back (through alignkit and
through plain transformers) with the same outputs; LoRA merges on save; the reference of a LoRA
policy is the base; precision and bad directories are handled."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from alignkit.config import LoraConfig, ModelConfig, RandomInitConfig
from alignkit.models.loading import adapters_off, load_causal_lm, load_tokenizer, save_causal_lm

TINY = RandomInitConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("reverse: abc -> cba", add_special_tokens=False)["input_ids"]])


def _train_adapters(model) -> None:
    """LoRA's B starts at zero (adapters are a no-op); give them a value so that they matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


def test_saved_directory_loads_back_the_same_in_alignkit_and_transformers(tmp_path, tokenizer):
    model = load_causal_lm(ModelConfig(random_init=TINY), tokenizer, seed=3)
    out = save_causal_lm(model, model.state_dict(), tokenizer, tmp_path / "m")
    ids = _ids(tokenizer)
    again = load_causal_lm(ModelConfig(path=str(out)), load_tokenizer(ModelConfig(path=str(out))))
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids))
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids))
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == tokenizer("abc")["input_ids"]


def test_random_init_is_seeded(tokenizer):
    a, b, c = (load_causal_lm(ModelConfig(random_init=TINY), tokenizer, seed=s) for s in (1, 1, 2))
    ids = _ids(tokenizer)
    torch.testing.assert_close(_logits(a, ids), _logits(b, ids))
    assert not torch.allclose(_logits(a, ids), _logits(c, ids))


def test_lora_merges_on_save_and_its_reference_is_the_base(tmp_path, tokenizer):
    base = load_causal_lm(ModelConfig(random_init=TINY), tokenizer, seed=0)
    policy = load_causal_lm(ModelConfig(random_init=TINY, lora=LoraConfig(enabled=True, r=4)), tokenizer, seed=0)
    _train_adapters(policy)
    ids = _ids(tokenizer)
    with adapters_off(policy, lora=True):
        torch.testing.assert_close(_logits(policy, ids), _logits(base, ids))
    adapted = _logits(policy, ids)
    assert not torch.allclose(adapted, _logits(base, ids), atol=1e-3)
    merged = save_causal_lm(policy, policy.state_dict(), tokenizer, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, ids), adapted, rtol=1e-4, atol=1e-4)


def test_adapters_off_leaves_a_plain_model_as_it_is(tokenizer):
    model = load_causal_lm(ModelConfig(random_init=TINY), tokenizer, seed=0)
    ids = _ids(tokenizer)
    with adapters_off(model, lora=True):
        torch.testing.assert_close(_logits(model, ids), _logits(model, ids))


def test_bf16_precision_loads_bf16_weights(tokenizer):
    model = load_causal_lm(ModelConfig(random_init=TINY, precision="bf16"), tokenizer)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_a_directory_without_config_is_named(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json.*empty"):
        load_causal_lm(ModelConfig(path=str(tmp_path / "empty")), tokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "missing")))
    (tmp_path / "empty" / "config.json").write_text("{}")  # weights and config, no tokenizer files
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files in .*empty.*model\.tokenizer_path"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "empty")))


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path, tokenizer):
    tokenizer = load_tokenizer(ModelConfig(random_init=TINY))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(ModelConfig(path=str(tmp_path / "tok")))
    assert loaded.pad_token == loaded.eos_token is not None


def test_a_saved_model_keeps_its_end_of_turn_tokens(tmp_path, tokenizer):
    """Llama-3-Instruct lists <|eot_id|> beside EOS in generation_config.json; a model saved after
    training must still stop there (a skeleton built from config.json alone would forget it)."""
    model = load_causal_lm(ModelConfig(random_init=TINY), tokenizer, seed=0)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 5]
    out = save_causal_lm(model, model.state_dict(), tokenizer, tmp_path / "m")
    assert GenerationConfig.from_pretrained(out).eos_token_id == [tokenizer.eos_token_id, 5]
    assert GenerationConfig.from_pretrained(out).use_cache is True
