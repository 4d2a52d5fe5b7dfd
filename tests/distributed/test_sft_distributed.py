"""2 gloo processes under torchrun give the same training as 1 process on the same global batch."""

import json
import os

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli, run_recipe

pytestmark = pytest.mark.distributed

COMMON = [
    "run",
    "sft",
    "--config",
    "tiny",
    "train.max_steps=6",
    "data.validation=null",
    "logging.tensorboard=false",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = run_cli(*COMMON, f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_processes_match_one(tmp_path, single, strategy):
    out = tmp_path / strategy
    result = run_cli(*COMMON, f"output_dir={out}", f"distributed.strategy={strategy}", "--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert "2 processes" in result.stderr
    # 2 processes reduce the same gradients in another order (fp32: ~1e-7 relative per sum); Adam
    # divides by sqrt(v), which magnifies that on coordinates whose gradient is near zero. The
    # bounds below hold with a wide margin on every machine seen; a real bug (a lost micro-batch, a
    # wrong normaliser) moves the loss by 1e-2 or more.
    assert losses(out) == pytest.approx(losses(single), rel=1e-4)
    a, b = load_file(str(single / "final/model.safetensors")), load_file(str(out / "final/model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_fsdp_cpu_offload_and_zero2_train_the_same(tmp_path, single):
    """FSDP2's CPU offload (shards, gradients and the AdamW step on the host) and ZeRO-2 (gathered
    weights kept from forward to backward) move memory, not the maths."""
    out = tmp_path / "levers"
    levers = ["distributed.fsdp.cpu_offload=true", "distributed.fsdp.reshard_after_forward=false"]
    result = run_cli(*COMMON, f"output_dir={out}", *levers, "--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert losses(out) == pytest.approx(losses(single), rel=1e-4)


def test_fsdp_bf16_params_keep_fp32_master_weights(tmp_path, single):
    """param_dtype bf16: the layers compute in bf16 (losses within bf16 rounding of fp32's, not
    equal) while the sharded weights, their update and final/ stay fp32."""
    out = tmp_path / "bf16"
    mp = ["distributed.fsdp.param_dtype=bf16", "distributed.fsdp.reduce_dtype=bf16"]
    result = run_cli(*COMMON, f"output_dir={out}", *mp, "--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert losses(out) == pytest.approx(losses(single), rel=2e-3)
    assert losses(out) != losses(single)
    a, b = load_file(str(single / "final/model.safetensors")), load_file(str(out / "final/model.safetensors"))
    assert {t.dtype for t in b.values()} == {a[next(iter(a))].dtype}
    assert 0 < max(float((a[k] - b[k]).abs().max()) for k in a) < 0.05


def test_fsdp_resume_in_two_processes(tmp_path):
    out = tmp_path / "resume"
    args = [*COMMON, f"output_dir={out}", "checkpoint.every=2", "--nproc", "2"]
    first = run_cli(*args, env={"ALIGNKIT_TEST_KILL_AT_STEP": "3"})
    assert first.returncode != 0 and (out / "checkpoints/step_2/COMPLETE").is_file()
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "step 2 of 6" in second.stderr
    straight = tmp_path / "straight"
    assert run_cli(*COMMON, f"output_dir={straight}", "--nproc", "2").returncode == 0
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6)


def test_lora_under_fsdp_matches_one_process(tmp_path):
    out, one = tmp_path / "lora", tmp_path / "lora1"
    result = run_cli(*COMMON, f"output_dir={out}", "model.lora.enabled=true", "--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert run_cli(*COMMON, f"output_dir={one}", "model.lora.enabled=true").returncode == 0
    assert losses(out) == pytest.approx(losses(one), rel=1e-4)  # same adapters on every rank
    sd = load_file(str(out / "final/model.safetensors"))
    assert not any("lora" in k for k in sd)
    assert losses(out)[-1] < losses(out)[0]


def test_a_data_error_in_every_rank_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 5\n')
    result = run_recipe("sft", tmp_path / "run", f"data.train.path={bad}", ok=False, nproc=2)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}:2: malformed JSON: Expecting ',' delimiter (column 1)"


def test_a_crashing_rank_is_named(tmp_path):
    # rank 1 dies of something alignkit does not report (at start-up, through sitecustomize)
    (tmp_path / "sitecustomize.py").write_text("import os\nif os.environ.get('RANK') == '1':\n    os._exit(3)\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    result = run_recipe("sft", tmp_path / "run", ok=False, nproc=2, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().endswith("error: rank 1 failed with exit code 3 (its output is above)")
    assert "ChildFailedError" not in result.stderr
