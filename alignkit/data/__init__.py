"""Datasets: formats and their validation, `builtin:` names, chat templates, tokenization with loss
masks, packing and collators, the task world's files. Import from the modules named in `__all__`.
"""

__all__ = [
    "batching",
    "cache",
    "distill",
    "formats",
    "io",
    "preference",
    "reward",
    "sft",
    "steerlm",
    "taskworld",
    "tokenize",
]
