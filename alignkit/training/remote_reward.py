"""The reward source on Ray ranks of its own (`placement.reward.ranks`, under `--launcher ray`).

A reward model as large as the policy need not sit beside the actor on every trainer rank: the
`reward` role's actors each build the configured source (`build_reward_source`, on their own GPU
when they reserve one) and trainer rank r sends its prompts and responses to reward rank r mod N.
The scorer is frozen and holds no process group, so the ranks answer independently; a dead or
failing reward rank is one error naming the role, rank and node.
"""

from __future__ import annotations

import os

import torch

from alignkit.config import ConfigError
from alignkit.rewards import RewardSourceConfig, build_reward_source
from alignkit.rewards.local import RewardOutput
from alignkit.training.distributed import Dist, barrier
from alignkit.training.placement import ROLES_ENV, role_actors

__all__ = ["RemoteReward", "RewardHost", "reward_source"]


class RewardHost:
    """What a reward actor holds: the source, built on the actor's device."""

    def __init__(self, cfg: RewardSourceConfig):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.source = build_reward_source(cfg, device=device)

    def score(self, prompts: list, responses: list[str]) -> RewardOutput:
        return self.source(prompts, responses)


class RemoteReward:
    """`(prompts, responses) -> RewardOutput`, answered by this trainer rank's reward rank."""

    def __init__(self, cfg: RewardSourceConfig, d: Dist):
        self.group = role_actors("reward")
        self.rank = d.rank % self.group.size
        if d.rank == 0:  # builds every reward rank once
            self.group.call_all("host", RewardHost, cfg)
        barrier(d)  # no trainer rank scores before every reward rank is built

    def __call__(self, prompts: list, responses: list[str]) -> RewardOutput:
        return self.group.call_rank(self.rank, "score", prompts, responses)


def reward_source(cfg, d: Dist):
    """The recipe's reward source `cfg.reward`: in this process, or on the `reward` role's Ray ranks
    (`placement.reward.ranks`, only under `--launcher ray`)."""
    ranks = cfg.placement.reward.ranks
    if not ranks:
        return build_reward_source(cfg.reward, device=str(d.device))
    if ROLES_ENV not in os.environ:
        raise ConfigError(
            f"placement.reward.ranks={ranks} places the reward source with Ray: run with --launcher ray "
            "(or set it to 0 to score in the trainer's processes)"
        )
    return RemoteReward(cfg.reward, d)
