"""Text-to-image pieces for DRaFT+: the tiny shape-world pipeline and its pretraining, the sampler
with truncated backprop and annealed guidance, image rewards, image grids. Import from the modules
named in `__all__`.
"""

__all__ = ["images", "inference", "pipeline", "pretrain", "reward", "sampling", "shapes"]
