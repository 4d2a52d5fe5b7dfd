"""Models: load and save Hugging Face checkpoints, LoRA, reward and value heads, the byte tokenizer,
and forward passes that compute logits where a loss needs them. Import from the modules named in `__all__`.
"""

__all__ = ["forward", "loading", "reward", "tokenizer"]
