"""Process-group set-up, model wrapping (FSDP2 or DDP) and collectives.

The same recipe runs as one plain process or under torchrun: `init_distributed` reads the
torchrun environment if present. On CPU the backend is gloo, on GPU NCCL. FSDP2
(`torch.distributed.fsdp.fully_shard`) shards each decoder layer and then the root;
`full_state_dict` gathers unsharded CPU weights (and optimizer state) for saving.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from alignkit.config import ConfigError, DistributedConfig, FSDPConfig, MeshConfig
from alignkit.models.loading import unwrap

__all__ = [
    "Dist",
    "all_reduce_sum",
    "barrier",
    "decoder_layers",
    "full_state_dict",
    "fsdp_sharded",
    "full_tensor",
    "gather_rollouts",
    "init_distributed",
    "score_sharded",
    "shutdown",
    "wrap_frozen",
    "wrap_model",
]


@dataclass(frozen=True)
class Dist:
    """This process's place: its rank among `world_size`, and in the device mesh
    `dp_replicate x dp_shard x tp` (row-major, tp innermost: rank = dp_rank * tp + tp_rank)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dp_replicate: int = 1
    tp: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: the processes that see different data (a TP group shares its batch)."""
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dp_shard(self) -> int:
        return self.dp_size // self.dp_replicate


def init_distributed(backend: str = "auto", mesh: MeshConfig | None = None) -> Dist:
    """Join the torchrun process group if there is one; otherwise a world of one. `mesh` must
    multiply out to the number of processes (`dp_shard` None: what remains)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    replicate, tp = _mesh_shape(mesh or MeshConfig(), world_size)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device, dp_replicate=replicate, tp=tp)


def _mesh_shape(mesh: MeshConfig, world_size: int) -> tuple[int, int]:
    """(dp_replicate, tp) checked against the world size; dp_shard is what remains."""
    rest, leftover = divmod(world_size, mesh.dp_replicate * mesh.tp)
    if leftover or (mesh.dp_shard is not None and mesh.dp_shard != rest):
        shard = "the rest" if mesh.dp_shard is None else mesh.dp_shard
        raise ConfigError(
            f"distributed.mesh: dp_replicate {mesh.dp_replicate} x dp_shard {shard} x tp {mesh.tp} does not "
            f"multiply out to this run's {world_size} process{'es' if world_size > 1 else ''} (--nproc)"
        )
    return mesh.dp_replicate, mesh.tp


def shutdown() -> bool:
    """Wait for every rank, then leave the process group. Returns whether there was one (False in a
    world of one)."""
    if not dist.is_initialized():
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over ranks (in place); CPU tensors are fine under gloo."""
    if d.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def score_sharded(num_items: int, width: int, d: Dist, score: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """(num_items, width) float64 results for a whole dataset, on every process: each data-parallel
    rank scores its share (items dp_rank, dp_rank + dp_size, ...) with `score(indices) -> (len(indices),
    width)`, writes it into zeros and the shares are summed. A tensor-parallel group scores its share
    together (its forwards are collectives) and only its first rank writes it. Every item is scored
    into the sum exactly once and the other terms are exact zeros, so the reduction adds nothing but
    zeros to each item's score."""
    mine = list(range(d.dp_rank, num_items, d.dp_size))
    out = torch.zeros(num_items, width, dtype=torch.float64)
    scores = score(mine)  # called even for an empty share: under FSDP its forwards are collectives
    if mine and d.rank % d.tp == 0:
        out[mine] = scores.double().cpu().reshape(len(mine), width)
    device = d.device if d.enabled and d.device.type == "cuda" else "cpu"  # NCCL reduces GPU tensors only
    return all_reduce_sum(out.to(device), d).cpu()


def gather_rollouts(rows: list, sums: dict[str, float], d: Dist) -> tuple[list, dict[str, float]]:
    """Every process's rows (concatenated in rank order) and summed statistics, on every process."""
    if not d.enabled:
        return rows, sums
    shares: list = [None] * d.world_size
    dist.all_gather_object(shares, (rows, sums))
    return [row for share, _ in shares for row in share], {k: sum(s[k] for _, s in shares) for k in sums}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the classes HF lists in `_no_split_modules`)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def fsdp_sharded(d: Dist, cfg: DistributedConfig) -> bool:
    """Whether this run's models are sharded by FSDP (several processes, strategy fsdp)."""
    return d.enabled and cfg.strategy == "fsdp"


def wrap_model(
    model: nn.Module, d: Dist, cfg: DistributedConfig, compile_layers: bool = False, tensor_parallel: bool = False
) -> nn.Module:
    """Move to the device, optionally compile each decoder layer, and with several processes
    shard (FSDP2, over the mesh's data-parallel dimensions; HSDP when `dp_replicate` > 1; with
    `cfg.fsdp`'s mixed precision, CPU offload and resharding) or replicate (DDP). With `d.tp` > 1
    the decoder layers are first split by tensor parallelism, which only callers whose data is
    split over data-parallel ranks allow (`tensor_parallel`)."""
    if not (fsdp_sharded(d, cfg) and cfg.fsdp.cpu_offload):
        model.to(d.device)  # offloaded: FSDP moves each shard to the host itself
    if compile_layers:
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)
    if not d.enabled:
        return model
    if cfg.strategy == "ddp":
        if d.tp > 1 or d.dp_replicate > 1:
            raise ConfigError("distributed.mesh with dp_replicate or tp above 1 needs distributed.strategy=fsdp")
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None
        )
    from torch.distributed.fsdp import fully_shard  # local: DTensor's import costs ~0.6 s, FSDP runs only

    from alignkit.training.parallel import device_mesh, parallelize  # local, as above

    layers = decoder_layers(model)
    if not layers:
        raise RuntimeError(f"FSDP: found no decoder layers to shard in {type(model).__name__}")
    mesh = device_mesh(d.device.type, d.dp_replicate, d.dp_shard, d.tp)
    if d.tp > 1:
        if not tensor_parallel:
            raise ConfigError(
                f"distributed.mesh.tp={d.tp}: this recipe splits its work over processes itself, so it runs data "
                "parallel only (tensor parallel: sft, steerlm, reward_model, offline dpo, ppo, reinforce, "
                "rejection_sampling, steerlm2); set distributed.mesh.tp=1"
            )
        parallelize(model, layers, mesh["tp"])
    data_mesh = mesh["dp_replicate", "dp_shard"] if d.dp_replicate > 1 else mesh["dp_shard"]
    layer_options = _fsdp_options(cfg.fsdp, d.device)
    for layer in layers:
        fully_shard(layer, mesh=data_mesh, **layer_options)
    fully_shard(model, mesh=data_mesh, **_fsdp_options(cfg.fsdp, d.device, root=True))
    return model


def wrap_frozen(model: nn.Module, d: Dist, cfg: DistributedConfig, tensor_parallel: bool = False) -> nn.Module:
    """A frozen copy that is called beside the trained model, micro-batch for micro-batch (the
    reference policy): in eval mode, without gradients, and under FSDP sharded like the trained
    model, so each rank holds 1/N of it instead of all of it (each forward gathers its layers:
    every rank must call it as often as the trained model, which the recipes do). `tensor_parallel`
    as for `wrap_model`: split like the trained model over a tensor-parallel group too."""
    model.eval().requires_grad_(False)
    if fsdp_sharded(d, cfg):
        return wrap_model(model, d, cfg, tensor_parallel=tensor_parallel)
    return model.to(d.device)


def _fsdp_options(cfg: FSDPConfig, device: torch.device, root: bool = False) -> dict:
    """fully_shard's keyword arguments for `cfg` (`root`: for the whole model, after its layers)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    # The root (embeddings, final norm, head) stays gathered from forward to backward, as FSDP2
    # does by default: backward needs it at once, and a value head read by a forward hook
    # (sequence_scores) is outside the root output whose hook would gather it again.
    options: dict = {"reshard_after_forward": cfg.reshard_after_forward and not root}
    if cfg.param_dtype != "fp32" or cfg.reduce_dtype != "fp32":
        # Layers pass bf16 activations on; the model's outputs (logits, values, scores) come back
        # fp32, so every loss and log-prob downstream is computed in fp32 as without it.
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=dtypes[cfg.param_dtype],
            reduce_dtype=dtypes[cfg.reduce_dtype],
            output_dtype=torch.float32 if root else None,
        )
    # pinned host memory needs an accelerator to pin for
    pinned = device.type == "cuda"
    options["offload_policy"] = CPUOffloadPolicy(pin_memory=pinned) if cfg.cpu_offload else OffloadPolicy()
    return options


def full_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, trainable_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Unsharded model (and optimizer) state on CPU. A collective: every rank must call it.
    `trainable_only`: leave out frozen parameters (a LoRA run's base weights)."""
    # local: torch.distributed.checkpoint costs ~0.6 s of start-up; only saving needs it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    target = unwrap(model)
    if optimizer is None:
        return get_model_state_dict(target, options=options), None
    return get_state_dict(target, optimizer, options=options)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a parameter: its shards gathered from every rank (a collective) when it is a
    DTensor (FSDP, TP), else the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
