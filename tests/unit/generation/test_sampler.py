import warnings

import pytest
import torch

from alignkit.config import SamplingConfig
from alignkit.generation.sampler import (
    _cache_argument,
    _filter_logits,
    _sample,
    _step_kwargs,
    generate,
    stop_token_ids,
)
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = tiny_model(tokenizer, seed=3).eval()
    questions = ["hi", "What is 12 + 30?", "Reverse the word 'stone'. " * 3]
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]
    return model, prompts


def hf_greedy(model, prompt, eos, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos)
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_argmax_decoding_with_rows_finishing_early(tokenizer, setup):
    model, prompts = setup
    # many "end" ids, so rows stop at different steps and the batch shrinks mid-way
    eos = list(range(40, 120))
    outs = generate(
        model, prompts, SamplingConfig(max_new_tokens=24, temperature=0), eos, tokenizer.pad_token_id, tokenizer.decode
    )
    lengths = set()
    for prompt, completion in zip(prompts, outs):
        assert completion.token_ids == hf_greedy(model, prompt, eos, 24)
        lengths.add(len(completion.token_ids))
        assert completion.is_end == (completion.token_ids[-1] in eos)
    assert len(lengths) > 1 or all(c.is_end for c in outs)


def test_sampled_logprobs_match_a_forward_pass(tokenizer, setup):
    model, prompts = setup
    outs = generate(
        model,
        prompts,
        SamplingConfig(max_new_tokens=16, temperature=1.0, n=3, seed=0),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.decode,
    )
    assert len(outs) == 9 and [c.prompt_index for c in outs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for c in outs:
        prompt = prompts[c.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.token_ids])).logits.float()
        reference = logits.log_softmax(-1)[0, len(prompt) - 1 : -1].gather(-1, torch.tensor(c.token_ids)[:, None])
        assert torch.allclose(reference.squeeze(-1), torch.tensor(c.logprobs), atol=1e-4)


def test_seeded_sampling_is_reproducible_and_samples_differ(tokenizer, setup):
    model, prompts = setup
    params = SamplingConfig(max_new_tokens=12, temperature=1.0, n=4, seed=7)
    a = generate(model, prompts[:1], params, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.decode)
    b = generate(model, prompts[:1], params, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.decode)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) > 1


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_cut_tokens():
    """One uniform per row: 200k draws of a distribution whose top-k cut zeroed some tokens land on
    each token with its probability (to 3 standard errors) and never on a zero-probability one,
    the first and the last included; the same generator seed gives the same draws."""
    logits = torch.tensor([-1e9, 1.0, 0.0, -1e9, 2.0, -0.5, -1e9])
    probs = logits.softmax(-1)
    rows = probs.expand(200_000, -1).contiguous()
    draws = _sample(rows, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=len(probs)).double() / len(draws)
    assert freq[probs == 0].sum() == 0
    assert ((freq - probs.double()).abs() <= 3 * (probs.double() * (1 - probs.double()) / len(draws)).sqrt()).all()
    assert torch.equal(draws[:100], _sample(rows[:100], torch.Generator().manual_seed(0)))


def test_stop_strings_cut_the_text(tokenizer, setup):
    model, prompts = setup
    free = generate(
        model,
        prompts[:1],
        SamplingConfig(max_new_tokens=20, temperature=0),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.decode,
    )[0]
    stop = free.text[5:7]
    assert stop
    cut = generate(
        model,
        prompts[:1],
        SamplingConfig(max_new_tokens=20, temperature=0, stop=(stop,)),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.decode,
    )[0]
    assert cut.finish_reason == "stop" and cut.is_end
    assert cut.text == free.text[: free.text.find(stop)]
    assert free.token_ids[: len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) < len(free.token_ids)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_k = _filter_logits(logits, SamplingConfig(top_k=2))
    assert torch.isinf(top_k[0, 2:]).all() and torch.isfinite(top_k[0, :2]).all()
    top_p = _filter_logits(logits, SamplingConfig(top_p=0.8))  # 0.5 + 0.3 reaches 0.8: keep two
    assert torch.isfinite(top_p[0, :2]).all() and torch.isinf(top_p[0, 2:]).all()
    top_p = _filter_logits(logits, SamplingConfig(top_p=0.81))
    assert torch.isfinite(top_p[0, :3]).all() and torch.isinf(top_p[0, 3])


def test_cache_argument_follows_the_models_signature(tokenizer, setup):
    class NewStyle(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return None

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    assert _cache_argument(NewStyle()) == "cache"
    assert _cache_argument(OldStyle()) == "past_key_values"
    from peft import LoraConfig, get_peft_model

    model, _ = setup
    peft_model = get_peft_model(tiny_model(tokenizer, seed=3), LoraConfig(r=2, target_modules=["q_proj"]))
    assert _cache_argument(peft_model) == _cache_argument(model)  # the wrapped model decides
    # the prompt pass asks for the last position's logits only where the model takes logits_to_keep
    assert _step_kwargs(OldStyle(), "kv") == {"past_key_values": "kv"}
    assert _step_kwargs(peft_model, "kv") == {_cache_argument(model): "kv", "logits_to_keep": 1}


def test_decoding_passes_the_cache_without_deprecation_warnings(tokenizer, setup):
    model, prompts = setup
    with warnings.catch_warnings():
        # transformers' deprecate_kwarg warns with FutureWarning (from 5.24 on past_key_values, removed in 5.40)
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        outs = generate(
            model,
            prompts,
            SamplingConfig(max_new_tokens=4, temperature=0),
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            tokenizer.decode,
        )
    assert all(len(c.token_ids) >= 1 for c in outs)


def test_decoding_records_no_autograd_graph(tokenizer, setup):
    """Sampling under autograd keeps every step's activations alive and costs about 15% of the
    decode speed; `generate` turns it off itself, whatever the caller's grad mode."""
    model, prompts = setup
    grad_modes = []
    hook = model.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    try:
        with torch.enable_grad():
            generate(
                model,
                prompts,
                SamplingConfig(max_new_tokens=3, temperature=1.0, seed=0),
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                tokenizer.decode,
            )
    finally:
        hook.remove()
    assert grad_modes and not any(grad_modes)


def test_stops_at_the_models_end_of_turn_token_not_only_eos(tokenizer, setup):
    """An instruct model ends its turn with a token its generation config lists beside EOS (Gemma's
    <end_of_turn>, Llama-3's <|eot_id|>). Make the greedy model's 3rd token such a token: sampling
    with the model's stop ids ends there ("eos", is_end), with the tokenizer's EOS alone it runs on."""
    model, prompts = setup
    free = generate(model, prompts[:1], SamplingConfig(max_new_tokens=8, temperature=0), [], 0, tokenizer.decode)[0]
    end_of_turn = free.token_ids[2]
    assert end_of_turn != tokenizer.eos_token_id and end_of_turn not in free.token_ids[:2]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    try:
        stops = stop_token_ids(model, tokenizer)
        assert stops[0] == tokenizer.eos_token_id and end_of_turn in stops
        greedy = SamplingConfig(max_new_tokens=8, temperature=0)
        ended = generate(model, prompts[:1], greedy, stops, 0, tokenizer.decode)
    finally:
        model.generation_config.eos_token_id = saved
    assert ended[0].token_ids == free.token_ids[:3]
    assert ended[0].finish_reason == "eos" and ended[0].is_end
    assert ended[0].text == tokenizer.decode(free.token_ids[:2])  # the stop token is not in the text
