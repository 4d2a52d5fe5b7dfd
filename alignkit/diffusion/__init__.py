"""Text-to-image pieces for DRaFT+ (issue 8): the shape world so far."""

__all__: list[str] = []
