"""Text-to-image pieces for DRaFT+: the shape world and its differentiable reward (so far)."""

__all__: list[str] = []
