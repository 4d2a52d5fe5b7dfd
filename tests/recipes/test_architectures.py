"""The architecture matrix: tiny random-init Llama, Qwen2, Qwen3, Mistral, Gemma2 and GPT-2 models saved
as Hugging Face directories (tests/architectures.py: with and without a chat template and a pad token,
each with an end-of-turn stop id of its own) go through alignkit and come out loading, scoring and
generating exactly as plain transformers does.

In process, on every architecture: the directory loads with the same logits through alignkit and
transformers (packed rows too); greedy samples equal `transformers.generate`'s; a reward model built
on it scores the same in `AutoModelForSequenceClassification`; sampling stops at the model's own
end-of-turn id, and would not at the tokenizer's EOS alone.

Through the real CLI, the recipes are spread over the architectures (each recipe on a model other
than Llama, each architecture in two runs or more, chained where recipes hand models on), and each
final model is checked against plain transformers. About 1.5 minutes on 2 CPU cores.

ALIGNKIT_FULL_MATRIX=1 also runs every recipe on every architecture (48 more runs, ~8 minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

from alignkit.config import LoraConfig, ModelConfig, SamplingConfig
from alignkit.generation.native import NativeEngine
from alignkit.generation.sampler import generate, stop_token_ids
from alignkit.models.loading import (
    adapters_off,
    load_causal_lm,
    load_for_eval,
    load_sequence_scorer,
    load_tokenizer,
    position_limit,
    save_causal_lm,
)
from alignkit.models.tokenizer import CHAT_TEMPLATE
from alignkit.rewards.local import LocalRewardModel
from alignkit.training.rollouts import sample_batches
from tests.architectures import ARCHITECTURES, END_OF_TURN, MAX_POSITIONS, TEMPLATE_OVERRIDE, save_architecture
from tests.conftest import read_metrics, run_cli, run_recipe

FULL_MATRIX = os.environ.get("ALIGNKIT_FULL_MATRIX") == "1"
PROMPTS = [
    [{"role": "user", "content": "reverse: abc"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 12 and 30, then say why"}],
]
RESPONSES = ["cba", "the answer is 42"]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("architectures")
    return {arch: save_architecture(arch, root / arch, seed=i) for i, arch in enumerate(ARCHITECTURES)}


def _prompt_ids(tokenizer) -> list[list[int]]:
    """Two prompts of different lengths, rendered by the tokenizer's template (or alignkit's)."""
    template = tokenizer.chat_template or CHAT_TEMPLATE
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True, chat_template=template)
        for p in PROMPTS
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _logits(model, ids: list[int], positions: list[int] | None = None) -> torch.Tensor:
    with torch.no_grad():
        kwargs = {} if positions is None else {"position_ids": torch.tensor([positions])}
        return model(input_ids=torch.tensor([ids]), **kwargs).logits[0].float()


def _assert_loads_identically(model_dir: Path) -> None:
    """alignkit's loaders (training and sampling) give transformers' logits; a packed row gives each
    sequence's own logits (position ids restarting at 0, as alignkit packs)."""
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(ModelConfig(path=str(model_dir)))
    trained = load_causal_lm(ModelConfig(path=str(model_dir)), tokenizer).eval()
    served, _ = load_for_eval(model_dir)
    a, b = _prompt_ids(tokenizer)
    expected_a, expected_b = _logits(plain, a), _logits(plain, b)
    torch.testing.assert_close(_logits(trained, a), expected_a)
    torch.testing.assert_close(_logits(served, a), expected_a)
    packed = _logits(trained, a + b, list(range(len(a))) + list(range(len(b))))
    torch.testing.assert_close(packed[: len(a)], expected_a)
    torch.testing.assert_close(packed[len(a) :], expected_b)
    assert position_limit(plain.config) == MAX_POSITIONS


def _assert_keeps_its_stop_tokens(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert GenerationConfig.from_pretrained(model_dir).eos_token_id == [tokenizer.eos_token_id, end_of_turn]


def _assert_scores_identically(rm_dir: Path) -> None:
    """alignkit's reward (LocalRewardModel: `alignkit score`, PPO, rejection sampling) equals the
    logit of plain transformers on the text the model's own template renders."""
    ours = LocalRewardModel(rm_dir).score(PROMPTS, RESPONSES).rewards
    plain = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    for prompt, response, reward in zip(PROMPTS, RESPONSES, ours):
        text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids).logits[0, 0], reward)


def _favour(model, token: int) -> None:
    """Make `token` the most likely next token everywhere: a bias on the output layer's logits."""
    bias = torch.zeros(model.get_output_embeddings().out_features)
    bias[token] = 1e4
    model.get_output_embeddings().register_forward_hook(lambda _module, _args, out: out + bias)


# --- in process: every architecture ------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_saved_model_loads_identically_in_alignkit_and_transformers(arch_dirs, arch):
    variant = ARCHITECTURES[arch]
    tokenizer = load_tokenizer(ModelConfig(path=str(arch_dirs[arch])))
    assert tokenizer.chat_template == variant.template
    assert tokenizer.pad_token == ("<pad>" if variant.pad else tokenizer.eos_token)  # EOS pads where none
    _assert_loads_identically(arch_dirs[arch])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_samples_equal_transformers_generate(arch_dirs, arch):
    """Left-padded batched KV-cache decoding gives what transformers gives each prompt alone."""
    model, tokenizer = load_for_eval(arch_dirs[arch])
    plain = AutoModelForCausalLM.from_pretrained(arch_dirs[arch]).eval()
    prompts = _prompt_ids(tokenizer)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0)
    ours = generate(model, prompts, greedy, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
    for prompt, completion in zip(prompts, ours):
        out = plain.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        assert completion.token_ids == out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sampling_stops_at_the_models_own_end_of_turn(arch_dirs, arch):
    """The model says END_OF_TURN first: generation (`alignkit generate`, eval, the server) and the
    rollout engine (RL, rejection sampling, online DPO) stop there, as transformers does; with the
    tokenizer's EOS alone they would run on to max_new_tokens."""
    model, tokenizer = load_for_eval(arch_dirs[arch])
    plain = AutoModelForCausalLM.from_pretrained(arch_dirs[arch]).eval()
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    _favour(model, end_of_turn)
    _favour(plain, end_of_turn)
    stops = stop_token_ids(model, tokenizer)
    assert sorted(stops) == sorted([tokenizer.eos_token_id, end_of_turn])
    prompts = _prompt_ids(tokenizer)
    greedy = SamplingConfig(max_new_tokens=4, temperature=0)
    for c in generate(model, prompts, greedy, stops, tokenizer.pad_token_id, tokenizer.decode):
        assert (c.token_ids, c.finish_reason, c.text) == ([end_of_turn], "eos", "")
    engine = NativeEngine(model, tokenizer)
    for _, batch in sample_batches(engine, prompts, SamplingConfig(max_new_tokens=4, n=2), lambda s: s):
        assert [(c.token_ids, c.is_end) for c in batch] == [([end_of_turn], True)] * 4
    eos_only = generate(model, prompts, greedy, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert [(len(c.token_ids), c.finish_reason) for c in eos_only] == [(4, "length")] * 2
    out = plain.generate(torch.tensor([prompts[0]]), max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    assert out[0, len(prompts[0]) :].tolist() == [end_of_turn]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_reward_model_on_it_scores_identically_in_transformers(arch_dirs, arch, tmp_path):
    tokenizer = load_tokenizer(ModelConfig(path=str(arch_dirs[arch])))
    tokenizer.chat_template = tokenizer.chat_template or CHAT_TEMPLATE  # what a run with data.chat_template saves
    scorer = load_sequence_scorer(ModelConfig(path=str(arch_dirs[arch])), tokenizer, num_labels=1)
    with torch.no_grad():
        scorer.score.weight.normal_()  # the head starts at zero: every score would be 0
    rm_dir = save_causal_lm(
        scorer, scorer.state_dict(), tokenizer, tmp_path / "rm", auto_class=AutoModelForSequenceClassification
    )
    _assert_scores_identically(rm_dir)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_adapters_merge_into_a_model_transformers_loads(arch_dirs, arch, tmp_path):
    """`all-linear` finds each architecture's layers (GPT-2's are Conv1D) and merging keeps the output."""
    cfg = ModelConfig(path=str(arch_dirs[arch]), lora=LoraConfig(enabled=True, r=4))
    tokenizer = load_tokenizer(cfg)
    policy = load_causal_lm(cfg, tokenizer).eval()
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapters an effect
                param.normal_(0, 0.5)
    ids = _prompt_ids(tokenizer)[1]
    adapted = _logits(policy, ids)
    with adapters_off(policy):
        assert not torch.allclose(_logits(policy, ids), adapted, atol=1e-3)
    merged = save_causal_lm(policy, policy.state_dict(), tokenizer, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, ids), adapted, rtol=1e-4, atol=1e-4)


# --- through the CLI: the recipes spread over the architectures --------------------------------

# Few steps on little data: each run takes ~5-10 s, most of it start-up.
FAST = {
    "sft": ["train.max_steps=2", "train.eval_every=2", "checkpoint.every=2", "data.train.path=builtin:sft?n=32&seed=0"],
    "dpo": [
        "train.max_steps=2",
        "train.eval_every=2",
        "checkpoint.every=2",
        "data.train.path=builtin:prefs?n=32&seed=0",
        "data.validation.path=builtin:prefs?n=8&seed=1",
    ],
    "reward_model": [
        "train.max_steps=2",
        "train.eval_every=2",
        "checkpoint.every=2",
        "data.train.path=builtin:prefs?n=32&seed=0",
        "data.validation.path=builtin:prefs?n=8&seed=1&split=valid",
        "normalization_samples=16",
    ],
    "distill": [
        "train.max_steps=2",
        "train.eval_every=2",
        "checkpoint.every=2",
        "data.train.path=builtin:sft?n=32&seed=0",
    ],
    "ppo": ["ppo.steps=1", "rollout.prompts_per_step=4"],
    "reinforce": ["reinforce.steps=1", "reinforce.estimator=grpo", "rollout.prompts_per_step=4"],
    "rejection_sampling": [
        "rs.iterations=1",
        "train.epochs=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "data.train.path=builtin:prompts?n=8&seed=0",
    ],
    "steerlm": [
        "train.max_steps=2",
        "train.eval_every=2",
        "checkpoint.every=2",
        "data.train.path=builtin:attributes?n=32&seed=0",
        "data.validation.path=builtin:attributes?n=8&seed=0&split=valid",
    ],
    "steerlm2": ["steerlm2.iterations=1", "data.train.path=builtin:steer?n=4&seed=0"],
}
DURATIONS: dict[str, float] = {}


def _run(recipe: str, out: Path, model_dir: Path, *overrides: str) -> Path:
    """`alignkit run RECIPE --config tiny` on the model at `model_dir`; its final/ directory. A model
    without a chat template is given alignkit's (data.chat_template), which final/ then keeps."""
    template = [] if AutoTokenizer.from_pretrained(model_dir).chat_template else [TEMPLATE_OVERRIDE]
    start = time.perf_counter()
    run_recipe(recipe, out, f"model.path={model_dir}", "model.random_init=null", *template, *FAST[recipe], *overrides)
    DURATIONS[out.name] = time.perf_counter() - start
    return out / "final"


def _check_causal_lm(final: Path) -> None:
    _assert_loads_identically(final)
    _assert_keeps_its_stop_tokens(final)
    assert AutoTokenizer.from_pretrained(final).chat_template  # the template it was trained with


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def gpt2_sft(arch_dirs, runs) -> Path:
    """GPT-2 as users get it: no chat template, no pad token, learned positions."""
    return _run("sft", runs / "sft_gpt2", arch_dirs["gpt2"])


@pytest.fixture(scope="module")
def mistral_rm(arch_dirs, runs) -> Path:
    """Turns end with EOS and EOS pads: the score is read before the trailing EOS."""
    return _run("reward_model", runs / "rm_mistral", arch_dirs["mistral"])


@pytest.fixture(scope="module")
def qwen2_steerlm(arch_dirs, runs) -> Path:
    return _run("steerlm", runs / "steerlm_qwen2", arch_dirs["qwen2"])


def test_sft_on_gpt2_saves_the_template_it_was_given(gpt2_sft):
    _check_causal_lm(gpt2_sft)
    assert AutoTokenizer.from_pretrained(gpt2_sft).chat_template == CHAT_TEMPLATE


def test_rejection_sampling_continues_the_gpt2_sft_model_with_its_saved_template(gpt2_sft, runs):
    _check_causal_lm(_run("rejection_sampling", runs / "rs_gpt2", gpt2_sft))


def test_dpo_on_gpt2_starts_at_log_2_despite_its_dropout(arch_dirs, runs):
    """GPT-2 ships dropout 0.1; with it on, the policy would differ from its identical reference."""
    final = _run("dpo", runs / "dpo_gpt2", arch_dirs["gpt2"])
    assert read_metrics(final.parent)[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    _check_causal_lm(final)


def test_a_mistral_reward_model_scores_identically_in_transformers(mistral_rm):
    _assert_scores_identically(mistral_rm)


def test_ppo_on_qwen3_with_a_llama_critic_and_the_mistral_reward_model(arch_dirs, runs, mistral_rm):
    final = _run(
        "ppo",
        runs / "ppo_qwen3",
        arch_dirs["qwen3"],
        f"critic.path={arch_dirs['llama']}",
        "reward.kind=model",
        f"reward.path={mistral_rm}",
    )
    _check_causal_lm(final)


def test_grpo_on_gemma2(arch_dirs, runs):
    _check_causal_lm(_run("reinforce", runs / "grpo_gemma2", arch_dirs["gemma2"]))


def test_distill_a_gemma2_student_from_a_qwen3_teacher(arch_dirs, runs):
    teacher = [f"teacher.path={arch_dirs['qwen3']}", "teacher.random_init=null"]
    _check_causal_lm(_run("distill", runs / "distill_gemma2", arch_dirs["gemma2"], *teacher))


def test_steerlm_then_steerlm2_on_qwen2_with_a_llama_prior(qwen2_steerlm, arch_dirs, runs):
    _check_causal_lm(qwen2_steerlm)
    final = _run("steerlm2", runs / "steerlm2_qwen2", qwen2_steerlm, f"steerlm2.prior_path={arch_dirs['llama']}")
    _check_causal_lm(final)


# --- through the CLI: one-line errors --------------------------------------------------------------


def _one_line_error(result, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), last


def test_a_truncated_model_is_one_line_in_run_and_generate(arch_dirs, tmp_path):
    broken = Path(shutil.copytree(arch_dirs["qwen3"], tmp_path / "broken"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    run = run_recipe("sft", tmp_path / "run", f"model.path={broken}", "model.random_init=null", ok=False)
    _one_line_error(run, "model.safetensors", "truncated or corrupt")
    gen = run_cli("generate", "--model", str(broken), "--prompts", "builtin:eval?n=2", "--out", str(tmp_path / "o"))
    _one_line_error(gen, "model.safetensors", "truncated or corrupt")


def _long_records(path: Path) -> Path:
    """Records longer than GPT-2's positions (one token per byte): where today it raises an IndexError."""
    record = {"prompt": "x" * (MAX_POSITIONS + 100), "response": "ok"}
    path.write_text("".join(json.dumps(record) + "\n" for _ in range(8)))
    return path


def test_a_max_seq_len_beyond_gpt2_positions_is_one_line(arch_dirs, tmp_path):
    too_long = f"data.max_seq_len={MAX_POSITIONS * 2}"
    data = f"data.train.path={_long_records(tmp_path / 'long.jsonl')}"
    model = [f"model.path={arch_dirs['gpt2']}", "model.random_init=null", TEMPLATE_OVERRIDE]
    run = run_recipe("sft", tmp_path / "run", *model, too_long, data, "data.validation=null", ok=False)
    _one_line_error(run, too_long, str(MAX_POSITIONS))


def test_a_prompt_beyond_gpt2_positions_is_one_line_in_generate(arch_dirs, tmp_path):
    prompts = str(_long_records(tmp_path / "long.jsonl"))
    gen = run_cli("generate", "--model", str(arch_dirs["gpt2"]), "--prompts", prompts, "--out", str(tmp_path / "o"))
    _one_line_error(gen, str(MAX_POSITIONS))


# --- ALIGNKIT_FULL_MATRIX=1: every recipe on every architecture -------------------------------------


@pytest.mark.skipif(not FULL_MATRIX, reason="set ALIGNKIT_FULL_MATRIX=1 for every recipe x architecture")
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "recipe", ["sft", "dpo", "reward_model", "distill", "ppo", "reinforce", "rejection_sampling", "steerlm"]
)
def test_full_matrix(arch_dirs, runs, recipe, arch):
    model_dir = arch_dirs[arch]
    extra = {"distill": [f"teacher.path={model_dir}", "teacher.random_init=null"]}.get(recipe, [])
    final = _run(recipe, runs / f"full_{recipe}_{arch}", model_dir, *extra)
    if recipe == "reward_model":
        _assert_scores_identically(final)
        return
    _check_causal_lm(final)
    if recipe == "steerlm":
        prior = f"steerlm2.prior_path={model_dir}"
        _check_causal_lm(_run("steerlm2", runs / f"full_steerlm2_{arch}", final, prior))


def test_report_durations():
    """Last in the file: how long each CLI run took (shown with -s), to keep the file near 3 minutes."""
    for name, seconds in sorted(DURATIONS.items()):
        print(f"{name:28s} {seconds:5.1f} s")
