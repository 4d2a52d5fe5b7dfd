"""Activation checkpointing of a Hugging Face decoder: which layers, what they keep, where.

`model.gradient_checkpointing` (GradientCheckpointingConfig) chooses
  - the layers: every `every_n_layers`-th decoder layer is checkpointed, the others keep their
    activations (memory traded back for speed; torchtitan's selective-by-layer AC);
  - what a checkpointed layer keeps: `full` keeps only its input and recomputes the whole layer
    in backward; `selective` also keeps the outputs of the matmuls and of attention and recomputes
    only the elementwise ops between them (torchtitan's op-level SAC, built on torch's
    `create_selective_checkpoint_contexts`);
  - where the kept tensors live: `offload` moves them to pinned host memory (`save_on_cpu`).

HF's own switch (`gradient_checkpointing_enable`) installs the checkpoint function on each
`GradientCheckpointingLayer`; this module then replaces that function and turns the skipped
layers off, so it works with any transformers 5 model whatever the switch's own options.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from alignkit.config import GradientCheckpointingConfig

__all__ = ["SAVED_OPS", "enable_checkpointing"]

_aten = torch.ops.aten
# The ops whose outputs a `selective` layer keeps: every linear (2-D mm/addmm after the view HF's
# Linear does, bmm for batched ones) and the fused attention kernels, whichever sdpa picks.
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_fn(cfg: GradientCheckpointingConfig):
    kwargs = {"use_reentrant": False}
    if cfg.mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
    if not cfg.offload:
        return functools.partial(checkpoint, **kwargs)

    def offloaded(function, *args, **more):
        # pinned only where there is a device to copy to: pinning needs an accelerator
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(function, *args, **kwargs, **more)

    return offloaded


def enable_checkpointing(model: nn.Module, cfg: GradientCheckpointingConfig) -> int:
    """Checkpoint `model`'s decoder layers as `cfg` says (in place, before LoRA or FSDP wrap it).
    Returns the number of layers checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # local: transformers' import

    if not cfg.enabled:
        return 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    fn = _checkpoint_fn(cfg)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % cfg.every_n_layers == 0
        layer._gradient_checkpointing_func = fn
    return sum(layer.gradient_checkpointing for layer in layers)
