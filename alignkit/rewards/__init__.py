"""Reward sources: prompts and responses in, a reward per response (and optionally one per attribute) out."""

from alignkit.rewards.local import LocalRewardModel, RewardOutput

__all__ = ["LocalRewardModel", "RewardOutput"]
