"""Reward sources: prompts and responses in, a reward per response (and optionally one per attribute) out."""

from alignkit.rewards.judge import ChatClient, JudgeConfig, JudgeError, JudgeReward, LocalChat
from alignkit.rewards.local import LocalRewardModel, RewardOutput
from alignkit.rewards.sources import (
    FunctionReward,
    OracleReward,
    RemoteRewardModel,
    RewardSourceConfig,
    RewardSourceError,
    build_reward_source,
)

__all__ = [
    "ChatClient",
    "JudgeConfig",
    "JudgeError",
    "JudgeReward",
    "LocalChat",
    "FunctionReward",
    "LocalRewardModel",
    "OracleReward",
    "RemoteRewardModel",
    "RewardOutput",
    "RewardSourceConfig",
    "RewardSourceError",
    "build_reward_source",
]
