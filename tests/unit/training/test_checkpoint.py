import torch

from alignkit.config import OptimConfig
from alignkit.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
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
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, D, keep_last=2)
    train_step(model, optimizer, scheduler)  # continues from the saved RNG state
    expected = [p.detach().clone() for p in model.parameters()]

    model2, optimizer2, scheduler2 = setup(1)
    assert load_checkpoint(latest_checkpoint(tmp_path), model2, optimizer2, scheduler2, D)["step"] == 3
    train_step(model2, optimizer2, scheduler2)
    assert all(torch.equal(a, b) for a, b in zip(expected, model2.parameters()))
    assert scheduler2.last_epoch == scheduler.last_epoch


def test_keep_last_and_incomplete_checkpoints_are_ignored(tmp_path):
    model, optimizer, scheduler = setup(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, D, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3"]
    # a directory left by a save killed before it was marked complete is never resumed from
    (tmp_path / "step_9").mkdir()
    (tmp_path / ".step_10.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_3"
    assert latest_checkpoint(tmp_path / "missing") is None
