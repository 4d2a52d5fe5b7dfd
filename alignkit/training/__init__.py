"""Training plumbing that recipes call: distributed set-up and FSDP2, the optimizer and schedule,
checkpoint and resume, metric loggers, the shared `fit` loop, rollouts and the RL core. Import from
the modules named in `__all__`.
"""

__all__ = ["checkpoint", "distributed", "logging", "loop", "optim", "rl", "rollouts", "sampled_pairs"]
