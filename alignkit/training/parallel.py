"""The device mesh and tensor parallelism (Megatron-style) for the Llama family of decoders.

The mesh is `dp_replicate x dp_shard x tp` (names as in `distributed.mesh`), tp innermost so a
tensor-parallel group is adjacent ranks (one node). Tensor parallelism splits each decoder
layer with `parallelize_module`: q/k/v and gate/up projections column-parallel (each rank holds
whole heads and a slice of the MLP's hidden units), o and down projections row-parallel (their
partial sums all-reduced), so a layer costs two all-reduces forward and two backward. HF's
attention reshapes with `view(*shape, -1, head_dim)`, so it runs unchanged on a rank's
`num_heads / tp` local heads; the embeddings, norms and head stay whole (sharded by FSDP only).
"""

from __future__ import annotations

import functools
import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

from alignkit.config import ConfigError

__all__ = ["TP_FAMILIES", "device_mesh", "parallelize"]

TP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # config.model_type values with the layout below


@functools.cache
def device_mesh(device_type: str, dp_replicate: int, dp_shard: int, tp: int) -> DeviceMesh:
    """The run's mesh, made once (its process groups are collectives: every model shares them)."""
    if tp == 1 and dp_replicate == 1:
        return init_device_mesh(device_type, (dp_shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(
        device_type, (dp_replicate, dp_shard, tp), mesh_dim_names=("dp_replicate", "dp_shard", "tp")
    )


def parallelize(model: nn.Module, layers: list[nn.Module], tp_mesh: DeviceMesh) -> None:
    """Split every decoder layer over `tp_mesh` in place (before FSDP wraps it)."""
    config = model.config
    tp = tp_mesh.size()
    if hasattr(model, "peft_config") or config.model_type not in TP_FAMILIES:
        kind = "a LoRA model" if hasattr(model, "peft_config") else f"model_type {config.model_type!r}"
        raise ConfigError(f"distributed.mesh.tp={tp}: tensor parallel covers {', '.join(TP_FAMILIES)}, not {kind}")
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, key) % tp:
            raise ConfigError(f"distributed.mesh.tp={tp} does not divide the model's {key}={getattr(config, key)}")
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    if config.model_type == "qwen3":
        # Qwen3 normalises each head: (B, T, local heads, head_dim) sharded on dim 2. As sequence
        # parallel over that dim the weight is a replicated DTensor, so its gradient (each rank's
        # partial sum over its own heads) is all-reduced over the group.
        plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    for layer in layers:
        parallelize_module(layer, tp_mesh, plan)
    # Gathering a (dp, tp)-sharded weight whole (final/) takes two all-gathers, which DTensor
    # reports as a warning per weight; it is the expected cost of a rare, one-off gather.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
