"""Ranks and roles placed by Ray (`--launcher ray`) on a local Ray cluster: the same training as
torchrun's with generation engines and PPO's critic on actors of their own; weights broadcast from
a trainer to a generation actor in another process, and a sync that never comes times out."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import read_metrics, run_recipe
from tests.recipes.test_ppo import VOWELS

pytestmark = pytest.mark.distributed

# a quarter CPU each: four actors and the two trainer ranks fit the 2-CPU local cluster
CRITIC_AND_REWARD = [
    "placement.critic.ranks=2",
    "placement.reward.ranks=2",
    "placement.critic.cpus=0.25",
    "placement.reward.cpus=0.25",
]
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
    "recipe,extra,roles",
    [
        # LoRA: the adapters arrive merged
        ("ppo", ["ppo.steps=2", "model.lora.enabled=true"], ["placement.generator.ranks=1"]),
        ("ppo", ["ppo.steps=2"], ["placement.critic.ranks=2"]),  # the critic on ranks of its own
        ("reinforce", ["reinforce.estimator=grpo", "reinforce.steps=2"], ["placement.generator.ranks=2"]),
        # the reward source on a rank of its own, serving both trainer ranks
        ("reinforce", ["reinforce.estimator=grpo", "reinforce.steps=2"], ["placement.reward.ranks=1"]),
        # critic and reward on ranks of their own, each reward rank in its critic rank's reservation
        ("ppo", ["ppo.steps=2"], [*CRITIC_AND_REWARD, "placement.reward.colocate_with=critic"]),
    ],
    ids=["ppo-lora-generator", "ppo-critic", "grpo-two-generators", "grpo-reward-role", "ppo-critic-reward-colocated"],
)
def test_ray_ranks_train_as_torchrun_ranks(tmp_path, recipe, extra, roles):
    """Same seed, same metrics: with generation engines on actors of their own, the weights they
    received after each update sample the same rollouts the trainer's own engine would; a critic
    on ranks of its own gives the same values and takes the same steps; a reward source on a rank
    of its own gives the same scores."""
    args = [*VOWELS, *extra, "checkpoint.every=null", "checkpoint.save_final=false"]
    run_recipe(recipe, tmp_path / "torchrun", *args, nproc=2)
    run_recipe(recipe, tmp_path / "ray", *args, *roles, "--launcher", "ray", nproc=2)
    same_run(tmp_path / "torchrun", tmp_path / "ray")


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


def _placements() -> dict[str, list[tuple[str, int]]]:
    """In a trainer rank: each placed role's ranks' (placement group, bundle index)."""
    import ray

    def where():
        context = ray.get_runtime_context()
        return context.get_placement_group_id(), context.get_assigned_resources()

    from alignkit.training.placement import role_actors

    roles = {}
    for name in ("critic", "reward"):
        group = role_actors(name)
        roles[name] = ray.get([w.run.remote(where, (), {}) for w in group.workers])
    return roles


@pytest.mark.parametrize("colocated", [True, False], ids=["colocated", "apart"])
def test_ray_colocated_roles_share_their_bundles(ray_cluster, colocated):
    """`placement.reward.colocate_with: critic`: reward rank i runs in critic rank i's bundle (one
    reservation, both roles' resources in it), not in a placement group of its own."""
    import ray

    from alignkit.config import PlacementConfig
    from alignkit.training.launch import ray_launch
    from alignkit.training.placement import placed_roles

    reward = {"ranks": 2, "cpus": 0.1, **({"colocate_with": "critic"} if colocated else {})}
    placement = PlacementConfig(critic={"ranks": 2, "cpus": 0.2}, reward=reward)
    roles = placed_roles(type("Cfg", (), {"placement": placement})())
    assert list(roles) == ["critic", "reward"]  # the host before its guest
    code, errors = ray_launch(1, _check_placements, (colocated,), None, (), roles)  # checks in the trainer rank
    assert (code, errors) == (0, []), errors
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]  # all freed


def _check_placements(colocated: bool) -> None:
    roles = _placements()
    critic, reward = ([pg for pg, _ in roles[name]] for name in ("critic", "reward"))
    assert len(set(critic)) == 1 and len(set(reward)) == 1
    assert (critic == reward) is colocated, roles
    import ray

    bundles = ray.util.placement_group_table()[critic[0]]["bundles"]
    # each critic bundle reserves the critic's 0.2 CPU, plus the reward's 0.1 when it shares them
    assert [b["CPU"] for b in bundles.values()] == pytest.approx([0.3 if colocated else 0.2] * 2)


def test_ray_vllm_engine_split_over_two_generator_ranks(tmp_path):
    """`sampling.vllm.tensor_parallel_size=2`: one vLLM engine spans both generator ranks (each holds
    half of every layer, its weights streamed in whole and sliced by vLLM, no copy of the policy); it
    samples the rollouts the trainer's own whole engine samples, and its log-probs stay the trainer's
    after every push."""
    from tests.recipes.test_vllm_recipes import ARCH, VLLM

    args = [*VOWELS, *ARCH, *VLLM, "reinforce.estimator=grpo", "reinforce.steps=2", "checkpoint.every=null"]
    args += ["checkpoint.save_final=false", "sampling.vllm.kv_cache_gib=0.25"]
    run_recipe("reinforce", tmp_path / "whole", *args, nproc=1)
    split = ["placement.generator.ranks=2", "sampling.vllm.tensor_parallel_size=2", "--launcher", "ray"]
    run_recipe("reinforce", tmp_path / "split", *args, *split, nproc=1)
    same_run(tmp_path / "whole", tmp_path / "split")
    assert all(m["rollout/logprob_abs_diff_max"] < 1e-4 for m in read_metrics(tmp_path / "split"))


def test_a_split_vllm_engine_needs_its_ranks(tmp_path):
    base = [*VOWELS, "sampling.backend=vllm", "sampling.vllm.tensor_parallel_size=2"]
    inside = run_recipe("reinforce", tmp_path / "inside", *base, ok=False)  # in the trainer's process
    assert inside.returncode == 2 and "placement.generator.ranks to a multiple of it" in inside.stderr
    odd = run_recipe("reinforce", tmp_path / "odd", *base, "placement.generator.ranks=3", "--launcher", "ray", ok=False)
    assert odd.returncode == 2 and "not a multiple of sampling.vllm.tensor_parallel_size=2" in odd.stderr
