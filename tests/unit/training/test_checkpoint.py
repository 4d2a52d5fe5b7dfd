import pytest
import torch

from alignkit.config import ConfigError, OptimConfig
from alignkit.training.checkpoint import latest_checkpoint, load_checkpoints, read_model_state, save_checkpoints
from alignkit.training.distributed import Dist
from alignkit.training.optim import build_optimizer, build_scheduler

D = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def setup(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = build_optimizer(model, OptimConfig(lr=0.1))
    return model, optimizer, build_scheduler(optimizer, 10, OptimConfig(lr=0.1))


def train_step(model, optimizer, scheduler):
    loss = model(torch.randn(3, 4)).pow(2).sum()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_save_load_round_trip_restores_everything(tmp_path):
    model, optimizer, scheduler = setup(0)
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    save_checkpoints(tmp_path, 3, {"model": (model, optimizer, scheduler)}, D, keep_last=2, extra={"beta": 0.5})
    train_step(model, optimizer, scheduler)  # continues from the saved RNG state
    expected = [p.detach().clone() for p in model.parameters()]

    model2, optimizer2, scheduler2 = setup(1)
    state = load_checkpoints(latest_checkpoint(tmp_path), {"model": (model2, optimizer2, scheduler2)}, D)
    assert state == {"step": 3, "extra": {"beta": 0.5}}
    train_step(model2, optimizer2, scheduler2)
    assert all(torch.equal(a, b) for a, b in zip(expected, model2.parameters()))  # and Adam's moments
    assert scheduler2.last_epoch == scheduler.last_epoch


def test_several_parts_in_one_checkpoint_and_a_reader_without_a_process_group(tmp_path):
    (a, *ra), (b, *rb) = setup(0), setup(1)
    save_checkpoints(tmp_path, 1, {"actor": (a, *ra), "critic": (b, *rb)}, D, keep_last=1)
    critic = read_model_state(tmp_path / "step_1", "critic")
    assert critic.keys() == b.state_dict().keys()
    assert all(torch.equal(critic[k], v) for k, v in b.state_dict().items())
    assert read_model_state(tmp_path / "step_1", "actor", ["0.bias"])["0.bias"].equal(a[0].bias)


def test_keep_last_and_incomplete_checkpoints_are_ignored(tmp_path):
    model, optimizer, scheduler = setup(0)
    for step in (1, 2, 3):
        save_checkpoints(tmp_path, step, {"model": (model, optimizer, scheduler)}, D, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3"]
    # a directory left by a save killed before it was marked complete is never resumed from
    (tmp_path / "step_9").mkdir()
    (tmp_path / ".step_10.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_3"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_a_checkpoint_of_the_former_format_is_named(tmp_path):
    old = tmp_path / "step_4"
    old.mkdir()
    (old / "state.pt").write_bytes(b"")
    (old / "COMPLETE").write_text("4\n")
    with pytest.raises(ConfigError, match=r"step_4 was written by an older alignkit.*checkpoint\.resume=false"):
        load_checkpoints(latest_checkpoint(tmp_path), {"model": setup(0)}, D)


def test_an_asynchronous_save_completes_and_loads(tmp_path):
    model, optimizer, scheduler = setup(0)
    train_step(model, optimizer, scheduler)
    weights = [p.detach().clone() for p in model.parameters()]
    save_checkpoints(tmp_path, 1, {"model": (model, optimizer, scheduler)}, D, keep_last=2, async_save=True)
    train_step(model, optimizer, scheduler)  # training goes on while the copy is written
    from alignkit.training.checkpoint import wait_for_checkpoint

    wait_for_checkpoint(D)
    assert latest_checkpoint(tmp_path).name == "step_1"
    model2, optimizer2, scheduler2 = setup(1)
    load_checkpoints(tmp_path / "step_1", {"model": (model2, optimizer2, scheduler2)}, D)
    assert all(torch.equal(a, b) for a, b in zip(weights, model2.parameters()))
