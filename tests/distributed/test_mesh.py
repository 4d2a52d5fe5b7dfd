"""2-D device meshes on gloo processes give the single-process training: tensor parallel (TP) over 2,
the shipped `tiny_2d` (FSDP 2 x TP 2 on 4 processes) and HSDP (2 replicas x FSDP 2). Same losses,
same final weights, and final/ of the TP run generates the single-process model's greedy text."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import run_cli
from tests.distributed.test_sft_distributed import losses

pytestmark = pytest.mark.distributed

SHORT = ["train.max_steps=4", "data.validation=null", "logging.tensorboard=false", "checkpoint.every=null"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = run_cli("run", "sft", "--config", "tiny", *SHORT, f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    return out


def assert_same_training(out, single):
    # FSDP, TP and HSDP sum the same gradients in other orders (fp32, ~1e-7 relative); a lost
    # micro-batch, a TP group counted twice or a wrong head split moves the loss by 1e-2 or more
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    a, b = load_file(str(single / "final/model.safetensors")), load_file(str(out / "final/model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_tensor_parallel_over_two_processes(tmp_path, single):
    out = tmp_path / "tp2"
    result = run_cli(
        "run", "sft", "--config", "tiny", *SHORT, f"output_dir={out}", "distributed.mesh.tp=2", "--nproc", "2"
    )
    assert result.returncode == 0, result.stderr
    assert "mesh: dp_replicate 1 x dp_shard 1 x tp 2" in result.stderr
    assert_same_training(out, single)
    prompt = torch.tensor([[72, 101, 108, 108, 111]])
    texts = [
        AutoModelForCausalLM.from_pretrained(path).eval().generate(prompt, max_new_tokens=12, do_sample=False)
        for path in (out / "final", single / "final")
    ]
    assert torch.equal(texts[0], texts[1])


def test_tensor_parallel_qwen3_all_reduces_its_per_head_norms(tmp_path):
    """Qwen3's q_norm/k_norm weights see only a rank's own heads: their gradients must be summed over
    the TP group, or the ranks' copies drift apart and the losses leave the single-process ones."""
    qwen3 = [*SHORT, "train.max_steps=3", "model.random_init.architecture=qwen3"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli("run", "sft", "--config", "tiny", *qwen3, f"output_dir={one}").returncode == 0
    result = run_cli(
        "run", "sft", "--config", "tiny", *qwen3, f"output_dir={two}", "distributed.mesh.tp=2", "--nproc", "2"
    )
    assert result.returncode == 0, result.stderr
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    a, b = load_file(str(one / "final/model.safetensors")), load_file(str(two / "final/model.safetensors"))
    norms = [k for k in a if "q_norm" in k or "k_norm" in k]
    assert norms and max(float((a[k] - b[k]).abs().max()) for k in norms) < 1e-5


def test_tiny_2d_fsdp_by_tensor_parallel_on_four_processes(tmp_path, single):
    out = tmp_path / "2d"
    result = run_cli("run", "sft", "--config", "tiny_2d", *SHORT, f"output_dir={out}", "--nproc", "4")
    assert result.returncode == 0, result.stderr
    assert "mesh: dp_replicate 1 x dp_shard 2 x tp 2" in result.stderr
    assert_same_training(out, single)


def test_hsdp_two_replicas_of_two_shards(tmp_path, single):
    out = tmp_path / "hsdp"
    mesh = ["distributed.mesh.dp_replicate=2", "distributed.mesh.dp_shard=2", "train.micro_batch_size=2"]
    result = run_cli("run", "sft", "--config", "tiny", *SHORT, f"output_dir={out}", *mesh, "--nproc", "4")
    assert result.returncode == 0, result.stderr
    assert_same_training(out, single)


def test_meshes_that_cannot_work_are_named(tmp_path):
    result = run_cli("run", "sft", "--config", "tiny", *SHORT, f"output_dir={tmp_path / 'a'}", "distributed.mesh.tp=3")
    assert result.returncode == 2
    assert "dp_replicate 1 x dp_shard the rest x tp 3 does not multiply out to this run's 1 process" in result.stderr
    tp = ["distributed.mesh.tp=2", "--nproc", "2"]
    result = run_cli("run", "distill", "--config", "tiny", f"output_dir={tmp_path / 'b'}", *tp)
    assert result.returncode == 2 and "runs data parallel only (tensor parallel: sft, steerlm" in result.stderr
    heads = "model.random_init.num_kv_heads=1"
    result = run_cli("run", "sft", "--config", "tiny", *SHORT, f"output_dir={tmp_path / 'c'}", heads, *tp)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "error: distributed.mesh.tp=2 does not divide the model's num_key_value_heads=1"
    )


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("dpo", ["reference.mode=cached"]),
        ("dpo", ["reference.mode=online"]),  # the frozen reference split like the policy
        ("reward_model", []),  # its exact report scores the validation set in shares of data-parallel ranks
        ("steerlm", []),
    ],
    ids=["dpo-cached", "dpo-online-reference", "reward_model", "steerlm"],
)
def test_tensor_parallel_in_the_other_offline_recipes(tmp_path, recipe, extra):
    """TP 2 on 2 processes against 1 process: the same losses (and the reward model's report)."""
    runs = {}
    for name, more in (("one", []), ("tp2", ["distributed.mesh.tp=2", "--nproc", "2"])):
        out = tmp_path / name
        result = run_cli("run", recipe, "--config", "tiny", *SHORT, *extra, f"output_dir={out}", *more)
        assert result.returncode == 0, result.stderr
        runs[name] = out
    train_losses = [
        [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        for out in (runs["one"], runs["tp2"])
    ]
    assert len(train_losses[0]) == 4 and train_losses[1] == pytest.approx(train_losses[0], rel=1e-5)
    if recipe == "reward_model":
        one, two = (json.loads((runs[k] / "eval.json").read_text()) for k in ("one", "tp2"))
        assert two.keys() == one.keys() and two == pytest.approx(one, rel=1e-4, abs=1e-6)


VOWELS = ["reward.kind=function", "reward.function=tests.recipes.test_ppo:vowel_reward"]
VLLM_TINY = [  # heads of 32 (vLLM's CPU attention), two KV heads to split
    "model.random_init.hidden_size=64",
    "model.random_init.num_heads=2",
    "model.random_init.num_kv_heads=2",
    "sampling.backend=vllm",
    "sampling.vllm.max_model_len=512",
    "sampling.vllm.kv_cache_gib=0.25",
]
RL_SHORT = ["checkpoint.every=null", "checkpoint.save_final=false", "logging.progress=none"]


def _all_metrics(out) -> list[dict]:
    """Every metrics row of a run and of its iterations, wall-clock times left out."""
    files = [out / "metrics.jsonl", *sorted(out.glob("iteration_*/metrics.jsonl"))]
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "throughput/", "perf/"))} for r in rows]


@pytest.mark.parametrize(
    "recipe, extra, baseline",
    [
        ("reinforce", [*VOWELS, "reinforce.estimator=grpo", "reinforce.steps=3"], []),
        ("ppo", [*VOWELS, "ppo.steps=2"], []),  # actor, reference and critic each split over the group
        # each rank's vLLM engine is fed the split policy's weights whole (gathered over the group)
        ("reinforce", [*VOWELS, "reinforce.estimator=grpo", "reinforce.steps=2", *VLLM_TINY], []),
        # it samples with the whole model, each process its own prompts (batched differently from one
        # process's), then trains split: against two data-parallel processes
        ("rejection_sampling", ["rs.iterations=1", "train.micro_batch_size=4"], ["--nproc", "2"]),
    ],
    ids=["grpo", "ppo", "grpo-vllm", "rejection_sampling"],
)
def test_tensor_parallel_in_the_sampling_recipes(tmp_path, recipe, extra, baseline):
    """TP 2 on 2 processes against 1 process: a tensor-parallel group shares its prompts and seeds
    and samples in lockstep, so the rollouts, rewards, losses and KL of every step are the
    one-process run's (and sums count its rollouts once)."""
    runs = {}
    for name, more in (("one", baseline), ("tp2", ["distributed.mesh.tp=2", "--nproc", "2"])):
        out = tmp_path / name
        result = run_cli("run", recipe, "--config", "tiny", *RL_SHORT, *extra, f"output_dir={out}", *more)
        assert result.returncode == 0, result.stderr
        runs[name] = _all_metrics(out)
    one, two = runs["one"], runs["tp2"]
    assert len(one) == len(two) >= 2
    for a, b in zip(one, two):
        assert b.keys() == a.keys() and b == pytest.approx(a, rel=1e-4, abs=1e-6)
