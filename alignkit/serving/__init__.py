"""HTTP servers: a reward model (`alignkit serve reward`) and an OpenAI-compatible generation server
(`alignkit serve generate`). Import from the modules named in `__all__`.
"""

__all__ = ["openai_server", "reward_server"]
