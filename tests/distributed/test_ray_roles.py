"""Roles on Ray actors of their own under `--launcher ray`: a killed trainer is named and resumes
with its critic; generation actors need the Ray launcher; one-step off-policy; the demo's stage
on Ray. (A module of its own, so that the two test workers share the Ray tests.)"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import read_metrics, run_recipe
from tests.distributed.test_ray_placement import same_run
from tests.recipes.test_ppo import VOWELS

pytestmark = pytest.mark.distributed


def test_a_killed_trainer_resumes_with_its_critic_on_ranks_of_its_own(tmp_path):
    """The critic checkpoints itself beside the trainer (critic_checkpoints/step_N, written before
    the trainer's step_N): after a kill both resume from step 2 and the run ends as an uninterrupted one."""
    args = [*VOWELS, "ppo.steps=3", "checkpoint.every=1", "placement.critic.ranks=1", "--launcher", "ray"]
    run_recipe("ppo", tmp_path / "whole", *args, nproc=1)
    killed = tmp_path / "killed"
    result = run_recipe("ppo", killed, *args, nproc=1, ok=False, env={"ALIGNKIT_TEST_KILL_AT_STEP": "2"})
    assert result.returncode == 1 and "role trainer rank 0" in result.stderr
    assert (killed / "critic_checkpoints" / "step_2").is_dir()
    run_recipe("ppo", killed, *args, nproc=1)
    same_run(tmp_path / "whole", killed)
    assert (killed / "critic" / "final" / "config.json").is_file()


@pytest.mark.parametrize("role", ["generator", "reward"])
def test_roles_of_their_own_need_the_ray_launcher(tmp_path, role):
    result = run_recipe("reinforce", tmp_path / "run", *VOWELS, f"placement.{role}.ranks=1", ok=False)
    assert result.returncode == 2 and "run with --launcher ray" in result.stderr


def test_one_step_off_policy_draws_the_next_step_during_the_update(tmp_path):
    """rollout.overlap: from the second step on, the samples were drawn during the previous update
    (staleness 1) from the weights before it, so the first ratio is no longer exactly 1."""
    args = [*VOWELS, "reinforce.estimator=grpo", "reinforce.steps=3", "checkpoint.every=null"]
    placed = ["placement.generator.ranks=1", "rollout.overlap=true", "--launcher", "ray"]
    run_recipe("reinforce", tmp_path / "run", *args, *placed, nproc=1)
    m = read_metrics(tmp_path / "run")
    assert [r["rollout/staleness"] for r in m] == [0.0, 1.0, 1.0]
    assert m[0]["actor/ratio"] == pytest.approx(1.0, abs=1e-6)  # on-policy: the ratio of one update is 1
    assert all(abs(r["actor/ratio"] - 1.0) > 1e-5 for r in m[1:])  # one update behind: it is not
    result = run_recipe("reinforce", tmp_path / "alone", *args, "rollout.overlap=true", ok=False)
    assert result.returncode == 2 and "needs generation actors of their own" in result.stderr


def test_the_demo_trains_a_stage_on_ray_as_in_process(tmp_path, monkeypatch):
    """`train_on_ray` (stage ppo_ray): the recipe's rank and its generator placed by Ray from the
    demo's own process, the same metrics as the recipe run in that process."""
    from alignkit.demo.common import Demo, train, train_on_ray
    from tests.conftest import REPO

    # one thread here and in the Ray actors (they inherit OMP_NUM_THREADS): the same float reductions
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        demo = Demo(tmp_path, None, {}, {})
        config = str(REPO / "configs" / "ppo" / "tiny.yaml")
        args = [*VOWELS, "ppo.steps=2", "checkpoint.every=null", "checkpoint.save_final=false", "logging.progress=none"]
        train(demo, "here", args, config=config)
        cfg = train_on_ray(demo, "placed", [*args, "placement.generator.ranks=1"], config=config)
        assert cfg.placement.generator.ranks == 1
    finally:
        torch.set_num_threads(threads)
    same_run(tmp_path / "here", tmp_path / "placed")
