"""The RL recipes' update step: leaving zero-advantage rollouts out of the passes is exact."""

from __future__ import annotations

import copy
from functools import partial

import torch

from alignkit.config import find_config, load_config
from alignkit.recipes import ppo
from alignkit.training import rl
from alignkit.training.distributed import Dist
from alignkit.training.loop import Run
from alignkit.training.optim import build_optimizer, build_scheduler
from alignkit.training.rollouts import Rollout
from tests.conftest import tiny_model


def test_skipping_zero_advantage_rollouts_gives_the_same_step(tokenizer, tmp_path):
    cfg = load_config(ppo.Config, find_config("ppo", "tiny"), [f"output_dir={tmp_path}"])
    run = Run(cfg, Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), tmp_path)
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i, advantage in enumerate([0.0, 1.5, 0.0, -0.7, 0.0]):
        response = torch.randint(3, 200, (3 + i,), generator=g).tolist()
        rollouts.append(Rollout({}, 0, [5, 6, 7 + i], response, "", True, advantages=torch.full((3 + i,), advantage)))
    minibatch = [[0, 1], [2, 4], [3]]  # the second micro-batch is all zero-advantage
    loss_fn = partial(rl.actor_loss, clip_eps=0.2)
    params = []
    for skip in (frozenset(), frozenset({0, 2, 4})):
        model = tiny_model(tokenizer, seed=4)
        optimizer = build_optimizer(model, cfg.optim)
        sums, units, _ = rl.train_on(
            run,
            model,
            optimizer,
            build_scheduler(optimizer, 1, cfg.optim),
            rollouts,
            minibatch,
            loss_fn,
            "actor_tokens",
            tokenizer.pad_token_id,
            skip,
        )
        assert units == sum(len(r.response_ids) for r in rollouts)  # skipped tokens still normalise
        params.append(copy.deepcopy(model.state_dict()))
    for key in params[0]:
        # Adam divides by the root of tiny second moments: float-level gradient differences show at ~1e-6
        torch.testing.assert_close(params[0][key], params[1][key], atol=1e-5, rtol=1e-5)
    assert any((params[0][k] != tiny_model(tokenizer, seed=4).state_dict()[k]).any() for k in params[0])
