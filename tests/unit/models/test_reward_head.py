"""Reward-model heads: scores at packed sequence ends, loading with a new head, saved statistics."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alignkit.config import ModelConfig, RandomInitConfig
from alignkit.data.batching import collate_rows
from alignkit.data.reward import scored_example
from alignkit.models.loading import load_causal_lm, load_sequence_scorer, save_causal_lm
from alignkit.models.reward import RewardModelInfo, score_sequences, sequence_scores
from alignkit.rewards import LocalRewardModel

TINY = RandomInitConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def scorer(tokenizer, labels=2, seed=0):
    model = load_sequence_scorer(ModelConfig(random_init=TINY), tokenizer, labels, seed=seed)
    with torch.no_grad():
        torch.manual_seed(7)
        model.score.weight.normal_()  # a non-trivial head
    return model.eval()


def test_new_head_starts_at_zero_and_knows_the_pad_token(tokenizer):
    model = load_sequence_scorer(ModelConfig(random_init=TINY), tokenizer, 3)
    assert model.score.weight.shape == (3, 32) and not model.score.weight.any()
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_packed_scores_equal_each_sequence_alone(tokenizer):
    model = scorer(tokenizer)
    a = tokenizer("<|user|>\nwhat is 2+2?</s><|assistant|>\n4</s>", add_special_tokens=False)["input_ids"]
    b = tokenizer("<|user|>\nhello</s><|assistant|>\nhi there, friend</s>", add_special_tokens=False)["input_ids"]
    batch = collate_rows(
        [[scored_example(a, ""), scored_example(b, "")], [scored_example(b, "")]], tokenizer.pad_token_id
    )
    with torch.no_grad():
        packed = sequence_scores(model, batch["input_ids"], batch["position_ids"], batch["target_ids"] != -100)
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in (a, b, b)]  # HF's own pooling
    assert packed.shape == (3, 2)
    torch.testing.assert_close(packed, torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_score_sequences_keeps_input_order_and_pads_to_min_batches(tokenizer):
    model = scorer(tokenizer)
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["a", "a much longer text", "mid text"]]
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    out = score_sequences(model, seqs, tokenizer.pad_token_id, batch_size=2, device=torch.device("cpu"), min_batches=4)
    assert len(calls) == 4  # 2 real batches + 2 dummies
    with torch.no_grad():
        expected = torch.stack([model(input_ids=torch.tensor([s])).logits[0] for s in seqs])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reward_info_weights_normalisation_and_round_trip(tokenizer, tmp_path):
    info = RewardModelInfo(["helpfulness", "verbosity"], [0.75, 0.25], mean=1.0, std=2.0)
    scores = torch.tensor([[4.0, 0.0], [2.0, 2.0]])
    # 0.75 * 4 + 0.25 * 0 = 3 -> (3 - 1) / 2 = 1;  0.75 * 2 + 0.25 * 2 = 2 -> 0.5
    assert info.reward(scores).tolist() == [3.0, 2.0]
    assert info.reward(scores, normalize=True).tolist() == [1.0, 0.5]

    model = scorer(tokenizer)
    out = save_causal_lm(
        model,
        model.state_dict(),
        tokenizer,
        tmp_path / "rm",
        auto_class=AutoModelForSequenceClassification,
        config_updates=info.config_updates(),
    )
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert RewardModelInfo.from_config(loaded.config) == info
    assert loaded.config.id2label == {0: "helpfulness", 1: "verbosity"}

    rm = LocalRewardModel(out, normalize=True)
    result = rm.score(["what is 2+2?", "hello"], ["4", [{"role": "assistant", "content": "hi"}]])
    ids = [rm.encode("what is 2+2?", "4"), rm.encode("hello", "hi")]
    with torch.no_grad():
        raw = torch.stack([model(input_ids=torch.tensor([s])).logits[0] for s in ids])
    torch.testing.assert_close(result.attributes, raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.rewards, info.reward(raw, normalize=True), atol=1e-5, rtol=1e-5)
    assert result.names == ["helpfulness", "verbosity"]


def test_backbone_from_a_causal_lm_directory_and_a_seeded_head(tokenizer, tmp_path):
    lm = load_causal_lm(ModelConfig(random_init=TINY), tokenizer, seed=3)
    path = save_causal_lm(lm, lm.state_dict(), tokenizer, tmp_path / "lm")
    rm = load_sequence_scorer(ModelConfig(path=str(path)), tokenizer, 1, seed=0)
    assert not rm.score.weight.any()
    torch.testing.assert_close(rm.model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)


def test_lora_trains_the_head_in_full(tokenizer):
    from alignkit.config import LoraConfig

    model = load_sequence_scorer(ModelConfig(random_init=TINY, lora=LoraConfig(enabled=True, r=4)), tokenizer, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert not any("up_proj.base_layer" in n for n in trainable)
    with pytest.raises(ValueError, match="no `score` head"):
        sequence_scores(
            load_causal_lm(ModelConfig(random_init=TINY), tokenizer),
            torch.ones(1, 2, dtype=torch.long),
            torch.arange(2)[None],
            torch.ones(1, 2, dtype=torch.bool),
        )


def test_init_head_to_mean_predicts_the_label_mean_on_average(tokenizer):
    from alignkit.models.reward import init_head_to_mean

    model = load_sequence_scorer(ModelConfig(random_init=TINY), tokenizer, 2).eval()
    seqs = [
        tokenizer(f"<|user|>\nq{i}</s><|assistant|>\n{'a' * i}</s>", add_special_tokens=False)["input_ids"]
        for i in range(1, 9)
    ]
    target = torch.tensor([2.5, -1.0])
    spread = init_head_to_mean(model, seqs, tokenizer.pad_token_id, target, batch_size=3)
    out = score_sequences(model, seqs, tokenizer.pad_token_id, 4, torch.device("cpu"))
    # W = mu u^T / |u|^2 with u the mean hidden state, so the mean prediction is exactly mu
    torch.testing.assert_close(out.mean(0), target, atol=1e-4, rtol=1e-4)
    assert 0 < spread < 1 and out.std(0).max() > 0  # inputs still tell apart
