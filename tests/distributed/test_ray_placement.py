"""Ranks placed by Ray (`--launcher ray`) on a local Ray cluster: the same training as torchrun's,
a killed rank named by role, rank and node, resume after the kill; weights broadcast from a
trainer to a generation actor in another process, and a sync that never comes times out."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import read_metrics, run_recipe
from tests.recipes.test_ppo import VOWELS

pytestmark = pytest.mark.distributed

STEADY = ("timing/", "throughput/", "rollout/logprob_abs_diff")  # wall-clock times; float noise (below)


def same_run(a, b) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert len(ma) == len(mb) > 0
    for ra, rb in zip(ma, mb):
        keep = [k for k in ra if not k.startswith(STEADY)]
        assert {k: rb[k] for k in keep} == pytest.approx({k: ra[k] for k in keep}, rel=1e-5, abs=1e-7)
        # the engine's gap to the trainer is float noise, which a process's thread count moves; an
        # engine left on stale weights would show a gap of the size of an update (> 1e-4)
        for k in (k for k in ra if k.startswith("rollout/logprob_abs_diff")):
            assert rb[k] == pytest.approx(ra[k], abs=1e-5)


@pytest.mark.parametrize(
    "recipe,extra,generators",
    [
        ("ppo", ["ppo.steps=2", "model.lora.enabled=true"], 1),  # LoRA: the adapters arrive merged
        ("reinforce", ["reinforce.estimator=grpo", "reinforce.steps=2"], 2),  # one generator per trainer rank
    ],
)
def test_ray_ranks_train_as_torchrun_ranks(tmp_path, recipe, extra, generators):
    """Same seed, same metrics: with generation engines on actors of their own, the weights they
    received after each update sample the same rollouts the trainer's own engine would."""
    args = [*VOWELS, *extra, "checkpoint.every=null", "checkpoint.save_final=false"]
    run_recipe(recipe, tmp_path / "torchrun", *args, nproc=2)
    placed = [f"placement.generator.ranks={generators}", "--launcher", "ray"]
    run_recipe(recipe, tmp_path / "ray", *args, *placed, nproc=2)
    same_run(tmp_path / "torchrun", tmp_path / "ray")


def test_generation_actors_need_the_ray_launcher(tmp_path):
    result = run_recipe("reinforce", tmp_path / "run", *VOWELS, "placement.generator.ranks=1", ok=False)
    assert result.returncode == 2 and "run with --launcher ray" in result.stderr


def test_a_killed_ray_rank_is_named_and_the_run_resumes(tmp_path):
    args = [*VOWELS, "reinforce.estimator=grpo", "reinforce.steps=3", "checkpoint.every=1", "--launcher", "ray"]
    run_recipe("reinforce", tmp_path / "whole", *args, nproc=1)
    killed = tmp_path / "killed"
    result = run_recipe("reinforce", killed, *args, nproc=1, ok=False, env={"ALIGNKIT_TEST_KILL_AT_STEP": "2"})
    assert result.returncode == 1
    assert "error: role trainer rank 0 on node " in result.stderr and "died" in result.stderr
    run_recipe("reinforce", killed, *args, nproc=1)  # resumes from step 2's checkpoint
    same_run(tmp_path / "whole", killed)


# --- weight sync between role groups -------------------------------------------------------------


def _train_and_send(port: int, seed: int) -> list[int]:
    """The trainer: a tiny model, moved by one optimizer step, its weights broadcast; its greedy
    answer to a fixed prompt."""
    from alignkit.models.tokenizer import byte_tokenizer
    from alignkit.training.weight_sync import WeightChannel
    from tests.conftest import tiny_model

    tok = byte_tokenizer()
    model = tiny_model(tok, seed=seed)
    ids = torch.tensor([tok("abc def", add_special_tokens=False)["input_ids"]])
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    WeightChannel("127.0.0.1", port, rank=0, world=2, timeout_s=60).send(model.state_dict().items())
    return _greedy(model, ids)


def _receive_and_generate(port: int, timeout_s: float) -> list[int]:
    """The generation actor: another tiny model (another seed), the trainer's weights loaded into it."""
    from alignkit.models.tokenizer import byte_tokenizer
    from alignkit.training.weight_sync import WeightChannel
    from tests.conftest import tiny_model

    tok = byte_tokenizer()
    engine = tiny_model(tok, seed=99)
    weights = WeightChannel("127.0.0.1", port, rank=1, world=2, timeout_s=timeout_s).receive()
    engine.load_state_dict(dict(weights))
    ids = torch.tensor([tok("abc def", add_special_tokens=False)["input_ids"]])
    return _greedy(engine, ids)


def _greedy(model, ids) -> list[int]:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from alignkit.training.placement import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_weights_reach_a_generation_actor_in_memory(ray_cluster):
    import ray

    from alignkit.training.placement import start_role

    trainer, generator = start_role("trainer", 1), start_role("generator", 1)
    try:
        port = _free_port()
        sent = trainer.workers[0].run.remote(_train_and_send, (port, 3), {})
        received = generator.workers[0].run.remote(_receive_and_generate, (port, 60.0), {})
        trained, engine = ray.get([sent, received], timeout=120)
        assert engine == trained  # the engine answers as the updated trainer
    finally:
        trainer.stop()
        generator.stop()


def test_a_weight_sync_that_never_comes_times_out_with_its_address(ray_cluster):
    from alignkit.training.placement import RoleError, start_role

    generator = start_role("generator", 1)
    port = _free_port()
    with pytest.raises(RoleError) as info:  # no trainer ever sends
        generator.run(_receive_and_generate, port, 2.0, timeout_s=60)
    message = str(info.value)
    assert "role generator rank 0 on node" in message and "WeightSyncError" in message
    assert f"weight sync over 127.0.0.1:{port} (rank 1 of 2)" in message


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


def test_the_demo_trains_a_stage_on_ray_as_in_process(tmp_path):
    """`train_on_ray` (stage ppo_ray): the recipe's rank and its generator placed by Ray from the
    demo's own process, the same metrics as the recipe run in that process."""
    from alignkit.demo.common import Demo, train, train_on_ray
    from tests.conftest import REPO

    demo = Demo(tmp_path, None, {}, {})
    config = str(REPO / "configs" / "ppo" / "tiny.yaml")
    args = [*VOWELS, "ppo.steps=2", "checkpoint.every=null", "checkpoint.save_final=false", "logging.progress=none"]
    train(demo, "here", args, config=config)
    cfg = train_on_ray(demo, "placed", [*args, "placement.generator.ranks=1"], config=config)
    assert cfg.placement.generator.ranks == 1
    same_run(tmp_path / "here", tmp_path / "placed")
