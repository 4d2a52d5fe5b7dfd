"""Generation engines on Ray actors of their own: the role "generator", placed by `--launcher ray`
with `placement.generator.ranks: E` beside the trainer's ranks, each actor holding a copy of the
policy and an engine of `sampling.backend` (native or vLLM). The recipe sees the `Engine` interface
(`generation/engine.py`) and does not know where generation runs:

    generate(prompts, params)   trainer rank r sends its prompts to generator r % E; the
                                completions come back (token ids, log-probs, text)
    update_weights(model)       trainer rank 0 broadcasts the policy's weights (LoRA merged) to every
                                generator over a process group of their own (`WeightChannel`),
                                in memory; the other trainer ranks wait at a barrier, so no rank
                                samples from the old weights

The generators' copies start from the trainer's weights (pushed once at start, after a resume too).
A sync that does not complete within `placement.sync_timeout_s` is a WeightSyncError naming the
address; a generator that dies is a RoleError naming its rank and node.
"""

from __future__ import annotations

import contextlib
import os
import socket
from functools import partial

import torch
from torch import nn

from alignkit.config import ConfigError, SamplingConfig
from alignkit.generation.engine import Engine, build_engine
from alignkit.generation.sampler import Completion
from alignkit.training.distributed import Dist, barrier
from alignkit.training.placement import ROLES_ENV, role_actors
from alignkit.training.weight_sync import WeightChannel

__all__ = ["GeneratorHost", "RemoteEngine", "rollout_engine"]


def rollout_engine(cfg, actor: nn.Module, tokenizer, d: Dist, autocast=contextlib.nullcontext) -> Engine:
    """The engine an online recipe samples with: in this process (`build_engine`), or on the
    generator actors `placement.generator.ranks` asks for (only under `--launcher ray`)."""
    placement = getattr(cfg, "placement", None)
    if placement is None or not placement.generator.ranks:
        if cfg.rollout.overlap:
            raise ConfigError(
                "rollout.overlap draws the next step while this one trains: it needs generation actors of "
                "their own (placement.generator.ranks >= 1, under --launcher ray)"
            )
        return build_engine(actor, tokenizer, cfg.sampling, autocast)
    if ROLES_ENV not in os.environ:
        raise ConfigError(
            f"placement.generator.ranks={placement.generator.ranks} places generation engines with Ray: "
            "run with --launcher ray (or set it to 0 to generate in the trainer's processes)"
        )
    return RemoteEngine(cfg, actor, d, placement.sync_timeout_s)


class GeneratorHost:
    """What a generator actor holds: the policy's copy and an engine sampling from it."""

    def __init__(self, cfg):
        from alignkit.models.loading import autocast, load_causal_lm, load_tokenizer

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(cfg.model)
        # the plain architecture: a LoRA policy's adapters arrive merged into its weights
        plain = cfg.model.model_copy(update={"lora": cfg.model.lora.model_copy(update={"enabled": False})})
        self.model = load_causal_lm(plain, self.tokenizer, seed=cfg.train.seed).to(device).eval()
        precision = partial(autocast, cfg.model.precision, device)
        self.engine = build_engine(self.model, self.tokenizer, cfg.sampling, precision)
        self.channel: WeightChannel | None = None

    def connect(self, host: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        self.channel = WeightChannel(host, port, rank, world, timeout_s)

    def receive(self) -> int:
        """The trainer's weights into the copy, then into the engine; the tensors received."""
        weights = dict(self.channel.receive())
        self.model.load_state_dict(weights)  # strict: a weight left out would sample from a stale one
        self.engine.update_weights(self.model)
        return len(weights)

    def generate(self, prompts: list[list[int]], params: SamplingConfig) -> list[Completion]:
        return self.engine.generate(prompts, params)


class RemoteEngine:
    def __init__(self, cfg, actor: nn.Module, d: Dist, timeout_s: float):
        self.d, self.timeout_s = d, timeout_s
        self.group = role_actors("generator")
        self.rank = d.rank % self.group.size  # the generator this trainer rank samples on
        self.channel = None
        if d.is_main:  # hosts the copies, and is the sending end of the weight channel
            self.group.call_all("host", GeneratorHost, cfg)
            host, port = _address()
            world = self.group.size + 1
            pending = [
                w.call.remote("connect", (host, port, i + 1, world, timeout_s), {})
                for i, w in enumerate(self.group.workers)
            ]
            self.channel = WeightChannel(host, port, 0, world, timeout_s)
            self.group.wait(pending)
        barrier(d)
        self.update_weights(actor)

    def generate(self, prompts: list[list[int]], params: SamplingConfig) -> list[Completion]:
        return self.group.call_rank(self.rank, "generate", prompts, params)

    def update_weights(self, model: nn.Module) -> None:
        """Rank 0 sends the weights (LoRA merged) and waits until every generator holds them. An
        FSDP actor's weights are gathered one at a time, with every rank taking part."""
        from alignkit.generation.vllm import merged_weights  # a plain function; vLLM itself is not imported

        if self.d.is_main:
            pending = [w.call.remote("receive", (), {}) for w in self.group.workers]
            self.channel.send(merged_weights(model))
            self.group.wait(pending, timeout_s=self.timeout_s)
        elif any(hasattr(p, "full_tensor") for p in model.parameters()):
            for _ in merged_weights(model):  # the other ranks' half of each gather
                pass
        barrier(self.d)


def _address() -> tuple[str, int]:
    """This node's address as the cluster sees it, and a free port on it."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]
