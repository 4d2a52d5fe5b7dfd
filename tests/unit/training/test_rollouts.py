"""The rollout plumbing: prompt schedule, the shared sampling loop, minibatch plan, packing order of
per-token tensors; and the RL core's `sample_rollouts` on top of it."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import SamplingConfig
from alignkit.data.io import DataError, Record
from alignkit.generation.native import NativeEngine
from alignkit.generation.sampler import generate
from alignkit.models.reward import RewardModelInfo
from alignkit.training.rl import sample_rollouts
from alignkit.training.rollouts import (
    Rollout,
    collate_rollouts,
    epoch_plan,
    forward_rollouts,
    pad,
    render_prompts,
    sample_batches,
    step_prompts,
    token_logps,
    token_values,
    unpad,
)
from tests.conftest import tiny_model


def test_step_prompts_walk_seeded_permutations_and_repeat_on_resume():
    steps = [step_prompts(10, s, 4, seed=7) for s in range(5)]  # 20 positions = 2 passes over 10 records
    first_pass = steps[0] + steps[1] + steps[2][:2]
    assert sorted(first_pass) == list(range(10))  # every record once per pass
    assert sorted(steps[2][2:] + steps[3] + steps[4]) == list(range(10))
    assert step_prompts(10, 3, 4, seed=7) == steps[3]  # a pure function of (step, seed)
    assert step_prompts(10, 0, 4, seed=8) != steps[0]


def test_epoch_plan_partitions_the_rollouts():
    plan = epoch_plan(10, minibatches=3, micro_batch_size=2, seed=0)
    assert len(plan) == 3
    flat = [i for mini in plan for mb in mini for i in mb]
    assert sorted(flat) == list(range(10))
    assert all(len(mb) <= 2 for mini in plan for mb in mini)
    assert epoch_plan(10, 3, 2, seed=0) == plan and epoch_plan(10, 3, 2, seed=1) != plan


def test_pad_and_unpad_round_trip():
    pieces = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0])]
    padded, mask = pad(pieces)
    assert padded.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]
    assert [p.tolist() for p in unpad(padded, mask)] == [[1, 2, 3], [4]]


def _rollout(prompt, response, **kw):
    return Rollout(prompt={}, group=0, prompt_ids=prompt, response_ids=response, text="", is_end=True, **kw)


def test_packed_per_token_results_come_back_to_their_rollouts(tokenizer):
    """Rollouts of different lengths packed into shared rows: the (N,) log-probs split back per
    rollout equal each rollout's own forward pass."""
    model = tiny_model(tokenizer, seed=1)
    rollouts = [_rollout([5, 6, 7], [8, 9]), _rollout([5], [10, 11, 12, 13]), _rollout([5, 6], [14])]
    together = forward_rollouts(lambda b: token_logps(model, b)[0], rollouts, [[0, 1, 2]], 0, "cpu")
    for r, got in zip(rollouts, together):
        alone = forward_rollouts(lambda b: token_logps(model, b)[0], [r], [[0]], 0, "cpu")[0]
        assert got.shape == (len(r.response_ids),)
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
        logits = model(torch.tensor([r.prompt_ids + r.response_ids])).logits[0].log_softmax(-1)
        n = len(r.prompt_ids)
        expected = logits[n - 1 : n - 1 + len(r.response_ids)].gather(-1, torch.tensor(r.response_ids)[:, None])
        torch.testing.assert_close(got, expected.squeeze(-1), atol=1e-5, rtol=0)


def test_collate_orders_the_constants_like_the_logits():
    rollouts = [
        _rollout([1, 2, 3, 4, 5], [6, 7], old_logps=torch.tensor([0.1, 0.2])),
        _rollout([1], [8], old_logps=torch.tensor([0.3])),
    ]
    rollouts[1].trains_actor = False
    batch = collate_rollouts(rollouts, 0)
    flat = torch.cat([rollouts[i].old_logps for i in batch["order"]])
    assert batch["old_logps"].tolist() == flat.tolist()
    assert batch["actor_tokens"] == 2 and batch["num_units"] == 3
    assert batch["response_lengths"] == [len(rollouts[i].response_ids) for i in batch["order"]]


def test_token_values_read_the_head_at_each_response_position(tokenizer):
    from alignkit.config import ModelConfig, RandomInitConfig
    from alignkit.models.loading import load_sequence_scorer

    cfg = ModelConfig(
        random_init=RandomInitConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    )
    critic = load_sequence_scorer(cfg, tokenizer, num_labels=2, seed=0)
    torch.nn.init.normal_(critic.score.weight)
    r = _rollout([5, 6, 7], [8, 9])
    info = RewardModelInfo(["a", "b"], [0.25, 0.75], mean=1.0, std=2.0)
    values = forward_rollouts(lambda b: token_values(critic, b, info, normalize=True), [r], [[0]], 0, "cpu")[0]
    scores = critic(torch.tensor([[5, 6, 7, 8, 9]])).logits  # HF pools the last token only: recompute per position
    hidden = critic.model(torch.tensor([[5, 6, 7, 8, 9]])).last_hidden_state[0]  # (5, d)
    per_position = critic.score(hidden) @ torch.tensor([0.25, 0.75])  # (5,)
    torch.testing.assert_close(values, (per_position[2:4] - 1.0) / 2.0, atol=1e-5, rtol=0)
    assert scores.shape == (1, 2)


def _records(*prompts):
    return [Record({"prompt": p}, f"prompts.jsonl:{i + 1}") for i, p in enumerate(prompts)]


def test_a_prompt_longer_than_the_context_names_its_record(tokenizer):
    model = tiny_model(tokenizer)
    with pytest.raises(DataError, match=r"prompts.jsonl:2: the prompt is \d+ tokens; with sampling.max_new_tokens=8"):
        sample_rollouts(
            NativeEngine(model, tokenizer),
            tokenizer,
            _records("short", "x" * 200),
            [0, 1],
            SamplingConfig(max_new_tokens=8),
            128,
            0,
            None,
        )


def test_sampled_rollouts_group_the_samples_of_a_prompt(tokenizer):
    model = tiny_model(tokenizer)
    out = sample_rollouts(
        NativeEngine(model, tokenizer),
        tokenizer,
        _records("a", "b", "c"),
        [2, 0],
        SamplingConfig(n=3, max_new_tokens=4, batch_size=1),
        256,
        0,
        None,
    )
    assert [r.group for r in out] == [0, 0, 0, 1, 1, 1]
    assert [r.prompt["prompt"] for r in out] == ["c"] * 3 + ["a"] * 3
    assert all(1 <= len(r.response_ids) <= 4 for r in out)


def test_sample_batches_seed_each_batch_by_the_callers_scheme(tokenizer):
    """Batches of `batch_size` prompts, the batch at offset `start` seeded `seed_of(start)`: the same
    completions as one `generate` call per batch with that seed; the model's mode is restored."""
    model = tiny_model(tokenizer).train()
    prompt_ids = render_prompts(tokenizer, _records("a", "bb", "ccc", "dddd", "e"), None)
    sampling = SamplingConfig(n=2, max_new_tokens=5, batch_size=2)
    got = list(sample_batches(NativeEngine(model, tokenizer), prompt_ids, sampling, lambda start: 100 + 7 * start))
    assert [start for start, _ in got] == [0, 2, 4] and model.training
    for start, completions in got:
        params = sampling.model_copy(update={"seed": 100 + 7 * start})
        alone = generate(
            model,
            prompt_ids[start : start + 2],
            params,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            tokenizer.decode,
        )
        assert [c.token_ids for c in completions] == [c.token_ids for c in alone]
        assert len(completions) == 2 * len(prompt_ids[start : start + 2])
