"""The rollout engine: batched KV-cache sampling with stop strings (`sampler`), and whole prompt
datasets sampled to JSONL (`offline`, `alignkit generate`). Import from the modules named in `__all__`.
"""

__all__ = ["offline", "sampler"]
