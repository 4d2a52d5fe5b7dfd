"""Evaluation on the task world: oracle-judged samples with confidence intervals, win rates, KL
(`alignkit eval`), and SteerLM attribute control. Import from the modules named in `__all__`.
"""

__all__ = ["evaluate", "stats", "steering"]
