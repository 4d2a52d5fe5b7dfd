"""Generation engines on Ray actors of their own: the role "generator", placed by `--launcher ray`
with `placement.generator.ranks: E` beside the trainer's ranks, each actor holding a copy of the
policy and an engine of `sampling.backend` (native or vLLM). The recipe sees the `Engine` interface
(`generation/engine.py`) and does not know where generation runs:

    generate(prompts, params)   trainer rank r sends its prompts to engine r % (E / T); the
                                completions come back (token ids, log-probs, text)
    update_weights(model)       trainer rank 0 broadcasts the policy's weights (LoRA merged) to every
                                generator over a process group of their own (`WeightChannel`),
                                in memory; the other trainer ranks wait at a barrier, so no rank
                                samples from the old weights

T is `sampling.vllm.tensor_parallel_size` (1 unless set): an engine too large for one device spans
T generator ranks (vLLM's `external_launcher`, a torch.distributed group of T per engine), each
handed the same prompts and every weight whole, of which it keeps its slice. With vLLM the weights
stream from the channel into the engine bucket by bucket: a generator holds no copy of the policy
(a 70B policy's engine holds its shard and KV cache only). The native engine samples from a copy.

The generators start from the trainer's weights (pushed once at start, after a resume too). A sync
that does not complete within `placement.sync_timeout_s` is a WeightSyncError naming the address; a
generator that dies is a RoleError naming its rank and node.
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
from alignkit.training.placement import ROLES_ENV, role_actors, set_rank_env
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
    tp = _engine_span(cfg.sampling)
    if placement.generator.ranks % tp:
        raise ConfigError(
            f"placement.generator.ranks={placement.generator.ranks} is not a multiple of "
            f"sampling.vllm.tensor_parallel_size={tp}: each engine spans {tp} generator ranks"
        )
    return RemoteEngine(cfg, actor, d, placement.sync_timeout_s)


class GeneratorHost:
    """What a generator actor holds: an engine, and for the native one the policy's copy it samples
    from. `env`: the torch.distributed environment of this rank's tensor-parallel engine."""

    def __init__(self, cfg, env: dict[str, str] | None = None):
        from alignkit.models.loading import autocast, causal_lm_skeleton, load_causal_lm, load_tokenizer

        set_rank_env(env or {})
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(cfg.model)
        # the plain architecture: a LoRA policy's adapters arrive merged into its weights
        plain = cfg.model.model_copy(update={"lora": cfg.model.lora.model_copy(update={"enabled": False})})
        self.channel: WeightChannel | None = None
        self.model = None
        if cfg.sampling.backend == "vllm":  # weights stream into the engine: no copy here
            from alignkit.generation.vllm import VLLMEngine  # local: vLLM is an optional extra

            skeleton = causal_lm_skeleton(plain, self.tokenizer)
            self.engine = VLLMEngine(skeleton, self.tokenizer, cfg.sampling.vllm, push_weights=False)
            return
        self.model = load_causal_lm(plain, self.tokenizer, seed=cfg.train.seed).to(device).eval()
        precision = partial(autocast, cfg.model.precision, device)
        self.engine = build_engine(self.model, self.tokenizer, cfg.sampling, precision)

    def connect(self, host: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        self.channel = WeightChannel(host, port, rank, world, timeout_s)

    def receive(self) -> int:
        """The trainer's weights into the engine (through the copy, for the native engine); the
        tensors received."""
        if self.model is None:
            count = 0

            def counted():
                nonlocal count
                for pair in self.channel.stream():
                    count += 1
                    yield pair

            self.engine.load_weights(counted())
            return count
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
        tp = _engine_span(cfg.sampling)
        engine = d.rank % (self.group.size // tp)  # the engine this trainer rank samples on
        self.ranks = list(range(engine * tp, (engine + 1) * tp))  # its generator ranks
        self.channel = None
        if d.is_main:  # hosts the engines, and is the sending end of the weight channel
            self._host(cfg, tp)
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

    def _host(self, cfg, tp: int) -> None:
        """Build every generator's engine; the ranks of a tensor-parallel engine join a
        torch.distributed group of their own, its first rank the rendezvous."""
        if tp == 1:
            self.group.call_all("host", GeneratorHost, cfg)
            return
        import ray

        places = ray.get([w.where.remote() for w in self.group.workers])  # (node, free port) per rank
        pending = []
        for rank, worker in enumerate(self.group.workers):
            host, port = places[rank - rank % tp]
            env = {"RANK": str(rank % tp), "WORLD_SIZE": str(tp), "MASTER_ADDR": host, "MASTER_PORT": str(port)}
            env["LOCAL_RANK"] = str(rank % tp)  # on CPU: vLLM binds each local rank to cores of its own
            pending.append(worker.host.remote(GeneratorHost, (cfg, env), {}))
        self.group.wait(pending)

    def generate(self, prompts: list[list[int]], params: SamplingConfig) -> list[Completion]:
        # every rank of a tensor-parallel engine takes the same call; their completions are equal
        return self.group.call_ranks(self.ranks, "generate", prompts, params)[0]

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


def _engine_span(sampling: SamplingConfig) -> int:
    """How many generator ranks one engine spans: vLLM's tensor parallel size, 1 for the native engine."""
    return sampling.vllm.tensor_parallel_size if sampling.backend == "vllm" else 1


def _address() -> tuple[str, int]:
    """This node's address as the cluster sees it, and a free port on it."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]
