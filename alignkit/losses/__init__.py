"""Pure loss functions: named tensors in, (loss, metrics) out; never a model or a config object.
Import from the modules named in `__all__`.
"""

__all__ = ["diffusion", "distill", "policy_gradient", "preference", "reward", "sft", "steerlm"]
