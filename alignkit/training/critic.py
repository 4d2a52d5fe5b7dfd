"""PPO's critic as a role: the value model with its optimizer and schedule, and the two things PPO
asks of it each step, values of the rollouts' tokens (on the first epoch's micro-batches, as the
old log-probs) and its epochs of clipped value-loss steps (`critic_loss`).

    Critic         in the trainer's own processes: its state is a part of the trainer's checkpoints
    RemoteCritic   on a Ray role of its own (`placement.critic.ranks` = the trainer's ranks under
                   `--launcher ray`; critic rank r serves trainer rank r): the same methods, the
                   rollouts sent to it and the values and loss sums returned; its ranks form a
                   process group of their own (DDP among them), and it checkpoints itself into
                   output_dir/critic_checkpoints/step_N before the trainer's step_N is written, so
                   a trainer checkpoint always has its critic's beside it

`build_critic` picks one from the config. The update plans are a pure function of the config, the
step and the rollouts (`update_plan`), so a critic elsewhere trains on the same micro-batches.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from torch import Tensor
from transformers import AutoConfig, AutoModelForSequenceClassification

from alignkit.config import ConfigError, ModelConfig
from alignkit.models.loading import load_sequence_scorer, load_tokenizer
from alignkit.models.reward import RewardModelInfo
from alignkit.training.checkpoint import latest_checkpoint, load_checkpoints, save_checkpoints
from alignkit.training.distributed import Dist, barrier, init_distributed, wrap_model
from alignkit.training.loop import Run, save_final
from alignkit.training.optim import build_optimizer, build_scheduler
from alignkit.training.placement import ROLES_ENV, RoleError, role_actors
from alignkit.training.rl import critic_loss, train_epochs, update_plan
from alignkit.training.rollouts import Rollout, token_values

__all__ = ["Critic", "RemoteCritic", "build_critic", "critic_model"]

_CHECKPOINTS = "critic_checkpoints"


def critic_model(cfg) -> tuple[ModelConfig, RewardModelInfo]:
    """Where the critic starts: `critic.path`, else the reward model (reward.kind model), else the
    actor's own model with a new value head (zero at first). A reward model's head is kept, with
    its attribute weights and statistics (the value is w . a, standardised with the reward)."""
    path = cfg.critic.path or (cfg.reward.path if cfg.reward.kind == "model" else None)
    if path is None:
        return cfg.model.model_copy(
            update={"lora": cfg.model.lora.model_copy(update={"enabled": False})}
        ), RewardModelInfo(["value"], [1.0])
    config = AutoConfig.from_pretrained(path)
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        info = RewardModelInfo.from_config(config)
    else:
        info = RewardModelInfo(["value"], [1.0])
    return ModelConfig(path=path, precision=cfg.model.precision), info


class Critic:
    def __init__(self, run: Run, cfg, tokenizer):
        model_cfg, self.info = critic_model(cfg)
        pc = cfg.ppo
        model = load_sequence_scorer(model_cfg, tokenizer, len(self.info.attributes), seed=cfg.train.seed)
        model = wrap_model(model, run.dist, cfg.distributed, tensor_parallel=True)  # split like the actor
        optimizer = build_optimizer(model, cfg.critic.optim)
        updates = pc.steps * pc.epochs * pc.minibatches
        self.part = (model, optimizer, build_scheduler(optimizer, updates, cfg.critic.optim))
        self.run, self.tokenizer, self.epochs, self.minibatches = run, tokenizer, pc.epochs, pc.minibatches
        self.values_of = partial(token_values, info=self.info, normalize=cfg.reward.normalize)
        self.loss = partial(critic_loss, info=self.info, normalize=cfg.reward.normalize, clip=pc.value_clip)

    @property
    def parts(self) -> dict:
        """What the trainer's checkpoints hold of the critic."""
        return {"critic": self.part}

    def values(self, rollouts: list[Rollout], step: int) -> list[Tensor]:
        """(R,) values of each rollout's response tokens, before any update of the step."""
        _, forward = update_plan(self.run, rollouts, self.epochs, self.minibatches, step, self.tokenizer.pad_token_id)
        return forward(lambda b: self.values_of(self.part[0], b))

    def train(self, rollouts: list[Rollout], step: int) -> tuple[dict, float, float]:
        """The step's value-loss epochs on rollouts carrying `values` and `returns`: (metric sums,
        global units, mean grad norm), as `train_epochs` gives them."""
        plans, _ = update_plan(self.run, rollouts, self.epochs, self.minibatches, step, self.tokenizer.pad_token_id)
        return train_epochs(self.run, self.part, rollouts, plans, self.loss, "num_units", self.tokenizer.pad_token_id)

    def resume(self, step: int) -> None:
        """(In the trainer's processes the critic resumed with the trainer's parts.)"""

    def checkpoint(self, done: int, steps: int) -> None:
        """(In the trainer's processes the critic is saved with the trainer's parts.)"""

    def save_final(self) -> None:
        save_final(
            self.run,
            self.part[0],
            self.tokenizer,
            self.info.config_updates(),
            AutoModelForSequenceClassification,
            "critic/final",
        )


class CriticHost:
    """A critic rank on its Ray actor: joins the critic's own process group, builds the critic,
    saves and loads it under output_dir/critic_checkpoints."""

    def __init__(self, cfg):
        import random

        import numpy as np
        import torch

        d = init_distributed(cfg.distributed.backend)
        random.seed(cfg.train.seed + d.rank)
        np.random.seed(cfg.train.seed + d.rank)
        torch.manual_seed(cfg.train.seed + d.rank)
        self.cfg, self.root = cfg, Path(cfg.output_dir) / _CHECKPOINTS
        self.critic = Critic(Run(cfg=cfg, dist=d, output_dir=Path(cfg.output_dir)), cfg, load_tokenizer(cfg.model))

    def values(self, rollouts: list[Rollout], step: int) -> list[Tensor]:
        return self.critic.values(rollouts, step)

    def train(self, rollouts: list[Rollout], step: int) -> tuple[dict, float, float]:
        return self.critic.train(rollouts, step)

    def save(self, done: int) -> None:
        cc = self.cfg.checkpoint
        save_checkpoints(self.root, done, self.critic.parts, self.critic.run.dist, cc.keep_last)

    def load(self, step: int) -> None:
        path = self.root / f"step_{step}"
        if latest_checkpoint(self.root) is None or not path.is_dir():
            raise RoleError(f"role critic: no checkpoint {path} beside the trainer's step {step}")
        load_checkpoints(path, self.critic.parts, self.critic.run.dist)

    def save_final(self) -> None:
        self.critic.save_final()


class RemoteCritic:
    """The `Critic` calls, answered by critic rank r (this trainer rank's) on its Ray actor. Every
    trainer rank calls its own at the same point of the step, so the critic ranks' collectives meet."""

    def __init__(self, cfg, d: Dist):
        rank = d.rank
        self.group = role_actors("critic")
        if self.group.size != int(os.environ.get("WORLD_SIZE", "1")):
            raise ConfigError(
                f"placement.critic.ranks={self.group.size}: the critic serves the trainer rank by rank; "
                f"use the trainer's number of ranks ({os.environ.get('WORLD_SIZE', '1')})"
            )
        self.rank, self.cfg = rank, cfg
        if rank == 0:  # builds every critic rank at once (they meet in their process group)
            self.group.call_all("host", CriticHost, cfg)
        barrier(d)  # no trainer rank calls its critic before every critic rank is built

    @property
    def parts(self) -> dict:
        return {}  # saved on its own ranks

    def values(self, rollouts: list[Rollout], step: int) -> list[Tensor]:
        return self._call("values", rollouts, step)

    def train(self, rollouts: list[Rollout], step: int) -> tuple[dict, float, float]:
        return self._call("train", rollouts, step)

    def resume(self, step: int) -> None:
        if step:
            self._call("load", step)

    def checkpoint(self, done: int, steps: int) -> None:
        """Saved when the trainer's checkpoint of `done` will be, and before it."""
        cc = self.cfg.checkpoint
        if cc.every and done % cc.every == 0 and done != steps:
            self._call("save", done)

    def save_final(self) -> None:
        self._call("save_final")

    def _call(self, method: str, *args):
        return self.group.call_rank(self.rank, method, *args)


def build_critic(run: Run, cfg, tokenizer) -> Critic | RemoteCritic:
    """The critic in the trainer's processes, or on its own Ray ranks (`placement.critic.ranks`)."""
    ranks = cfg.placement.critic.ranks
    if not ranks:
        return Critic(run, cfg, tokenizer)
    if ROLES_ENV not in os.environ:
        raise ConfigError(f"placement.critic.ranks={ranks} places the critic with Ray: run with --launcher ray")
    return RemoteCritic(cfg, run.dist)
