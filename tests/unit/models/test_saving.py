"""Saved models generate with the KV cache on, although training turns it off."""

from transformers import AutoModelForCausalLM, GenerationConfig

from alignkit.models.loading import save_causal_lm
from tests.conftest import tiny_model


def test_saved_model_generates_with_the_kv_cache(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    assert model.config.use_cache is False  # training mode
    out = save_causal_lm(model, model.state_dict(), tokenizer, tmp_path / "m")
    assert AutoModelForCausalLM.from_pretrained(out).config.use_cache is True
    assert GenerationConfig.from_pretrained(out).use_cache is True  # `generate` reads this one
