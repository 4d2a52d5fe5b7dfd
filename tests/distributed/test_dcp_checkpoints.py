"""Sharded checkpoints (torch.distributed.checkpoint) under 2 gloo processes: each rank writes its own
shards, a checkpoint saved on 2 processes resumes on 1, a save killed before it is complete leaves the
previous checkpoint to resume from, and `alignkit export` turns a checkpoint into the final/ model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import run_cli
from tests.distributed.test_sft_distributed import COMMON, losses

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-process run of 6 steps, checkpointed every 2 (kept: step_4, step_6)."""
    out = tmp_path_factory.mktemp("straight")
    result = run_cli(*COMMON, f"output_dir={out}", "checkpoint.every=2", "--nproc", "2")
    assert result.returncode == 0, result.stderr
    return out


def test_saved_on_two_processes_resumes_on_one(tmp_path, straight):
    out = tmp_path / "run"
    first = run_cli(
        *COMMON, f"output_dir={out}", "checkpoint.every=2", "--nproc", "2", env={"ALIGNKIT_TEST_KILL_AT_STEP": "3"}
    )
    assert first.returncode != 0
    shards = sorted((out / "checkpoints/step_2").glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]  # one file of shards per rank
    sizes = [p.stat().st_size for p in shards]
    assert max(sizes) < 0.7 * sum(sizes)  # each rank wrote about half, not the whole state
    second = run_cli(*COMMON, f"output_dir={out}", "checkpoint.every=2")  # one process: DCP reshards
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "step 2 of 6" in second.stderr
    assert losses(out)[:2] == losses(straight)[:2]  # the lines of the steps before the checkpoint, kept
    # after it, one process reduces in another order than two (see test_two_processes_match_one)
    assert losses(out) == pytest.approx(losses(straight), rel=1e-4)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_save_killed_before_it_is_complete_resumes_from_the_previous_one(tmp_path, straight, mode):
    out = tmp_path / mode
    args = [*COMMON, f"output_dir={out}", "checkpoint.every=2", f"checkpoint.async_save={mode == 'async'}"]
    # SIGKILL on rank 0 once every rank's shards of step 4 are on disk, before it is marked complete
    first = run_cli(*args, "--nproc", "2", env={"ALIGNKIT_TEST_KILL_IN_SAVE": "4"})
    assert first.returncode != 0
    checkpoints = out / "checkpoints"
    assert (checkpoints / "step_2/COMPLETE").is_file() and not (checkpoints / "step_4").exists()
    assert sorted(p.name for p in (checkpoints / ".step_4.tmp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    second = run_cli(*args, "--nproc", "2")
    assert second.returncode == 0, second.stderr
    assert "step 2 of 6" in second.stderr
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_4", "step_6"]  # the torn save replaced


def test_export_writes_the_final_model(tmp_path, straight):
    out = tmp_path / "exported"
    result = run_cli("export", "--checkpoint", str(straight / "checkpoints/step_6"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    final = straight / "final"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (final / name).read_bytes(), name
    ids = torch.tensor([[1, 72, 101, 108, 108, 111, 44, 32, 119]])
    exported, trained = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (out, final))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)
    missing = run_cli("export", "--checkpoint", str(straight / "checkpoints/step_2"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "not a complete checkpoint" in missing.stderr  # pruned: keep_last 2
