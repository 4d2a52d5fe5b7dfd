"""A saved reward model scores the same in alignkit and in plain transformers, also when the pad
token is the EOS that the chat template ends every turn with (GPT-2, Llama, Mistral tokenizers have
no pad token; alignkit pads with EOS): transformers reads the score at the last non-pad token."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignkit.config import ModelConfig, RandomInitConfig
from alignkit.models.loading import load_sequence_scorer, save_causal_lm
from alignkit.models.reward import RewardModelInfo
from alignkit.models.tokenizer import byte_tokenizer
from alignkit.rewards import LocalRewardModel

# every turn ends with EOS, as many real templates do (Llama-2, Mistral, Zephyr's)
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"


def test_pad_equal_to_eos_scores_the_same_in_transformers(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = TEMPLATE
    cfg = ModelConfig(
        random_init=RandomInitConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    )
    model = load_sequence_scorer(cfg, tokenizer, num_labels=1, seed=0)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # a new head is zero: every score would tie
    out = save_causal_lm(
        model,
        model.state_dict(),
        tokenizer,
        tmp_path / "rm",
        auto_class=AutoModelForSequenceClassification,
        config_updates=RewardModelInfo(["reward"], [1.0]).config_updates(),
    )

    prompts, responses = ["What is 2 + 2?", "Reverse 'stone'."], ["4", "The reverse is enots, I believe."]
    ours = LocalRewardModel(out).score(prompts, responses).rewards

    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    texts = [
        hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        for p, r in zip(prompts, responses)
    ]
    assert all(t.endswith(hf_tokenizer.eos_token) for t in texts)
    batch = hf_tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf_model(**batch).logits[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
