"""The memory plan: exact parameter counts, the activation estimate against what autograd saves,
sharding, the suggestion, the CLI; and (slow) the plan against a measured training step."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.config import ConfigError, LoraConfig, ModelConfig, RandomInitConfig, load_config
from alignkit.models.loading import load_causal_lm, load_sequence_scorer, load_tokenizer
from alignkit.recipes import dpo, sft
from alignkit.training.memory_plan import (
    _arch,
    _layer_activation_elements,
    arch_of,
    count_params,
    lora_params,
    parse_bytes,
    plan,
    suggest,
)

TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def _model(**random_init) -> ModelConfig:
    return ModelConfig(random_init=RandomInitConfig(**{**TINY, **random_init}))


def _numel(model, trainable=False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def test_tiny_llama_count_by_hand_equals_the_built_model():
    """Byte tokenizer: V = 263. h 64, 4 heads of 16, 2 KV heads (kv 32), MLP 128, untied head.
    per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288; gate, up, down 3*64*128 = 24576;
               two RMSNorms 2*64 = 128                                         -> 36992
    total: embed 263*64 + 2 * 36992 + final norm 64 + head 263*64 = 107712"""
    model = _model()
    assert len(load_tokenizer(model)) == 263
    assert count_params(arch_of(model)) == 263 * 64 + 2 * 36992 + 64 + 263 * 64 == 107712
    assert _numel(load_causal_lm(model, load_tokenizer(model))) == 107712


def test_tiny_gpt2_tied_count_by_hand_equals_the_built_model():
    """GPT-2, tied: wte 263*64, wpe 2048*64. per layer: c_attn 64*192 + 192, attn c_proj 64*64 + 64,
    c_fc 64*128 + 128, mlp c_proj 128*64 + 64, two LayerNorms 4*64 -> 33472; ln_f 128; no head.
    total: 16832 + 131072 + 2 * 33472 + 128 = 214976"""
    model = _model(architecture="gpt2", tie_word_embeddings=True)
    assert count_params(arch_of(model)) == 16832 + 131072 + 2 * 33472 + 128 == 214976
    assert _numel(load_causal_lm(model, load_tokenizer(model))) == 214976


@pytest.mark.parametrize(
    "random_init",
    [{}, {"architecture": "gpt2"}, {"architecture": "qwen2"}, {"architecture": "qwen3"}, {"tie_word_embeddings": True}],
)
def test_counts_equal_the_built_models_with_lm_and_value_heads(random_init):
    model = _model(**random_init)
    tokenizer, arch = load_tokenizer(model), arch_of(model)
    assert count_params(arch) == _numel(load_causal_lm(model, tokenizer))
    assert count_params(arch, head=1) == _numel(load_sequence_scorer(model, tokenizer, 1))


@pytest.mark.parametrize(
    "architecture, targets",
    [("llama", "all-linear"), ("llama", ["q_proj", "v_proj"]), ("gpt2", "all-linear"), ("gpt2", ["c_attn"])],
)
def test_lora_trainable_count_equals_peft(architecture, targets):
    model = _model(architecture=architecture).model_copy(
        update={"lora": LoraConfig(enabled=True, r=4, target_modules=targets)}
    )
    peft_model = load_causal_lm(model, load_tokenizer(model))
    assert lora_params(arch_of(model), 4, targets) == _numel(peft_model, trainable=True)


@pytest.mark.parametrize("sizes", [(64, 2, 4, 2, 128, 263), (256, 2, 8, 8, 704, 263), (256, 2, 8, 2, 704, 4000)])
def test_activation_estimate_is_within_10_percent_of_what_autograd_saves(sizes):
    """The reliable quantity on CPU: the bytes of the (distinct) tensors autograd saves for
    backward in one forward, the model's parameters left out, against the per-layer estimate
    plus the one saved logit copy (the log-softmax)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, layers, heads, kv, inter, vocab = sizes
    config = LlamaConfig(
        hidden_size=h,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        head_dim=h // heads,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    b, s = 4, 128
    ids = torch.randint(0, vocab, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, position_ids=torch.arange(s).expand(b, s), use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), ids.reshape(-1))
    estimate = layers * _layer_activation_elements(_arch(config), 1) * b * s * 4 + b * s * vocab * 4
    assert 0.9 < sum(saved.values()) / estimate < 1.1


def _sft(path="configs/sft/tiny.yaml", overrides=()):
    return load_config(sft.Config, path, list(overrides))


def test_fsdp_shards_the_trained_state_over_dp_shard_x_tp_and_ddp_replicates():
    one = plan(_sft(), "sft")
    four = plan(_sft("configs/sft/tiny_2d.yaml"), "sft")
    assert four.mesh == (1, 2, 2) and four.strategy == "fsdp"
    for name in ("parameters", "gradients", "optimizer"):
        assert getattr(four, name) == getattr(one, name) // 4
    assert four.activations < one.activations  # tp splits the heads and the MLP
    ddp = plan(_sft(overrides=["distributed.strategy=ddp"]), "sft", gpus=4)
    assert (ddp.parameters, ddp.optimizer) == (one.parameters, one.optimizer)


def test_precision_and_lora_and_checkpointing():
    fp32 = plan(_sft(), "sft")
    assert fp32.optimizer == 2 * fp32.parameters == 2 * 4 * 107712
    bf16 = plan(_sft(overrides=["model.precision=bf16"]), "sft")
    assert bf16.parameters == fp32.parameters // 2
    lora = plan(_sft(overrides=["model.lora.enabled=true", "model.lora.r=4"]), "sft")
    assert lora.params_trainable == 8192 and lora.optimizer == 8 * 8192
    ckpt = plan(_sft(overrides=["model.gradient_checkpointing=true"]), "sft")
    assert ckpt.activations < fp32.activations


def test_checkpointing_modes_keep_less_in_order():
    gc, four = "model.gradient_checkpointing", "model.random_init.num_layers=4"
    none = plan(_sft(overrides=[four]), "sft").activations
    full = plan(_sft(overrides=[four, f"{gc}=true"]), "sft").activations
    selective = plan(_sft(overrides=[four, f"{gc}.enabled=true", f"{gc}.mode=selective"]), "sft").activations
    every_2 = plan(_sft(overrides=[four, f"{gc}.enabled=true", f"{gc}.every_n_layers=2"]), "sft").activations
    assert full < selective < none and full < every_2 < none


def test_fsdp_levers_gathered_weights_offload_and_bf16_params():
    """tiny on 2 processes (FSDP): the root (embed 263*64, norm 64, head 263*64 = 33728) and two
    layers of 36992 are gathered whole in fp32: (33728 + 2 * 36992) * 4 = 430848 bytes."""
    four_layers = ["model.random_init.num_layers=4"]
    base = plan(_sft(overrides=four_layers), "sft", gpus=2)
    assert base.gathered == (33728 + 2 * 36992) * 4 == 430848
    zero2 = plan(_sft(overrides=[*four_layers, "distributed.fsdp.reshard_after_forward=false"]), "sft", gpus=2)
    assert zero2.gathered == (33728 + 4 * 36992) * 4
    off = plan(_sft(overrides=[*four_layers, "distributed.fsdp.cpu_offload=true"]), "sft", gpus=2)
    assert off.parameters == off.gradients == off.optimizer == 0
    assert off.host == base.parameters + base.gradients + base.optimizer and off.total < base.total
    bf16 = plan(_sft(overrides=[*four_layers, "distributed.fsdp.param_dtype=bf16"]), "sft", gpus=2)
    assert bf16.activations == base.activations // 2 and bf16.gathered == base.gathered // 2
    assert bf16.parameters == base.parameters  # the sharded master weights stay fp32
    assert plan(_sft(), "sft").gathered == 0  # one process: nothing to gather


def test_dpo_holds_a_reference_copy_when_scored_online():
    cfg = load_config(dpo.Config, "configs/dpo/tiny.yaml", ["reference.mode=online"])
    assert plan(cfg, "dpo").extra_models == {"reference": 4 * 107712}
    cached = load_config(dpo.Config, "configs/dpo/tiny.yaml", ["reference.mode=cached"])
    assert plan(cached, "dpo").extra_models == {}


def test_roles_placed_by_ray_are_not_on_the_trainer_ranks():
    """The shipped 70B PPO config: critic and reward model on Ray ranks of their own, generation on
    split vLLM engines; the trainer's 16 ranks hold the sharded LoRA actor only, and it fits 80 GiB."""
    from alignkit.recipes import ppo

    cfg = load_config(ppo.Config, "configs/ppo/llama3_70b_lora.yaml")
    placed = plan(cfg, "ppo", gpus=16, gpu_memory=parse_bytes("80GiB"))
    assert placed.extra_models == {} and placed.fits()
    assert arch_of(cfg.model).layers == 80
    inside = load_config(
        ppo.Config,
        "configs/ppo/llama3_70b_lora.yaml",
        ["placement.reward.ranks=0", "placement.reward.colocate_with=null"],
    )
    assert set(plan(inside, "ppo", gpus=16).extra_models) == {"reward model"}


def test_suggest_finds_a_fitting_mesh_or_none():
    cfg = _sft()
    best = suggest(cfg, "sft", gpus=4, gpu_memory=parse_bytes("1GiB"))
    assert best is not None and best.fits() and best.mesh[1] * best.mesh[2] == 4
    assert suggest(cfg, "sft", gpus=1, gpu_memory=parse_bytes("1MiB")) is None
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("141e9") == 141 * 10**9
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_bytes("lots")


def test_cli_prints_the_plan_of_tiny_2d_and_one_line_errors():
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--config", "configs/sft/tiny_2d.yaml"])
    assert result.exit_code == 0, result.output
    assert "dp_shard 2 x tp 2" in result.output and "optimizer (AdamW)" in result.output
    result = runner.invoke(app, ["plan", "--config", "configs/sft/tiny.yaml", "--gpus", "2", "--gpu-memory", "1GiB"])
    assert result.exit_code == 0 and "headroom" in result.output and "suggestion:" in result.output
    offload = ["--gpus", "2", "distributed.fsdp.cpu_offload=true"]
    result = runner.invoke(app, ["plan", "--config", "configs/sft/tiny.yaml", *offload])
    assert result.exit_code == 0 and "gathered (FSDP)" in result.output and "host (cpu_offload)" in result.output
    result = runner.invoke(app, ["plan", "--config", "configs/sft/tiny.yaml", "train.micro_batch_size=1"])
    assert result.exit_code == 0 and "micro-batch 1 x seq 128" in result.output
    for args in (["--config", "nope.yaml"], ["--config", "configs/sft/tiny.yaml", "--gpu-memory", "1XB"]):
        result = runner.invoke(app, ["plan", *args])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and result.output.startswith("error:")


_MEASURE = """
import json, sys, torch, torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(1)
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
config = LlamaConfig(**json.loads(sys.argv[1]))
model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
b, s = int(sys.argv[2]), int(sys.argv[3])
ids = torch.randint(0, config.vocab_size, (b, s))
base = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
for step in range(2):
    for micro in range(2):  # accumulation: gradients live beside the next micro-batch's activations
        out = model(input_ids=ids, position_ids=torch.arange(s).expand(b, s), use_cache=False)
        loss = F.cross_entropy(out.logits.float().reshape(-1, config.vocab_size), ids.reshape(-1))
        del out  # as in alignkit's loss functions: the logits are gone by backward
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({"delta": rss("VmHWM") - base}))
"""


@pytest.mark.slow
def test_plan_within_20_percent_of_measured_peak_rss_on_a_100m_model(tmp_path):
    """A ~100M random Llama (h 768, 12 layers, vocab 32000; 134M with its untied head), fp32,
    AdamW, micro-batch 2 x seq 256, two micro-batches per step: the peak RSS over the loaded
    model against the plan's gradients + optimizer + activations + logits. glibc's malloc keeps
    freed blocks (its mmap threshold grows with them), so the threshold is pinned for the run."""
    sizes = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12)
    sizes.update(intermediate_size=2048, vocab_size=32000, head_dim=64)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **sizes}))
    env = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(sizes), "2", "256"], env=env, capture_output=True, check=True
    )
    measured = json.loads(out.stdout.decode().strip().splitlines()[-1])["delta"]
    cfg = _sft(overrides=[f"model.path={tmp_path}", "model.random_init=null", "train.micro_batch_size=2"])
    cfg.data.max_seq_len = 256
    planned = plan(cfg, "sft").training_state
    print(f"measured {measured / 2**20:.0f} MiB, planned {planned / 2**20:.0f} MiB: {measured / planned:.3f}")
    assert 0.8 < measured / planned < 1.2, (measured, planned)
