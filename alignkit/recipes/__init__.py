"""The recipe table: one module per algorithm, each with a typed `Config` and `main(cfg)`.

The CLI and the demo both look recipes up here. Modules are imported on demand (a recipe pulls
in its own heavy dependencies, e.g. diffusers for `draftp`), so `alignkit ls` stays fast.
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType

from alignkit.config import ConfigError

__all__ = ["RECIPES", "VARIANTS", "recipe_module"]

# name -> module with `Config` (a RecipeConfig) and `main(cfg)`.
RECIPES = {
    "sft": "alignkit.recipes.sft",
    "distill": "alignkit.recipes.distill",
    "dpo": "alignkit.recipes.dpo",
    "reward_model": "alignkit.recipes.reward_model",
    "rejection_sampling": "alignkit.recipes.rejection_sampling",
    "steerlm": "alignkit.recipes.steerlm",
    "steerlm2": "alignkit.recipes.steerlm2",
    "ppo": "alignkit.recipes.ppo",
    "reinforce": "alignkit.recipes.reinforce",
    "cai": "alignkit.recipes.cai",
    "draftp": "alignkit.recipes.draftp",
}

# Algorithms that are an option of a recipe rather than a recipe of their own.
VARIANTS = {
    "grpo": "reinforce with reinforce.estimator=grpo",
    "rloo": "reinforce (reinforce.estimator=rloo, the default)",
    "dr_grpo": "reinforce with reinforce.estimator=grpo reinforce.scale_rewards=false "
    "reinforce.loss_aggregation=seq-mean-token-sum",
    "dapo": "reinforce --config tiny_dapo (grpo with reinforce.max_draws, reinforce.clip_eps_high=0.28, "
    "reinforce.overlong_buffer, reinforce.train_unended=false)",
    "gspo": "reinforce --config tiny_gspo (reinforce.policy_loss=gspo, loss_aggregation=seq-mean-token-mean)",
    "cispo": "reinforce with reinforce.policy_loss=cispo",
    "reinforce_pp": "reinforce with reinforce.estimator=reinforce_pp (or reinforce_pp_baseline)",
    "reinforce++": "reinforce with reinforce.estimator=reinforce_pp (or reinforce_pp_baseline)",
    "kto": "dpo with loss.type=kto",
    "ipo": "dpo with loss.type=ipo",
    "simpo": "dpo with loss.type=simpo",
    "orpo": "dpo with loss.type=orpo",
    "rpo": "dpo with loss.type=rpo_sq (or rpo_bwd_kl, rpo_fwd_kl)",
    "online_dpo": "dpo with an `online:` section (iterative on-policy DPO)",
    "rm": "reward_model",
    "kd": "distill",
    "draft": "draftp with draftp.kl_coeff=0",
}


def recipe_module(name: str) -> ModuleType:
    """The recipe's module; an unknown name fails with the nearest valid one."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f"; use {VARIANTS[name]}" if name in VARIANTS else f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint} (recipes: {', '.join(RECIPES)})")
    return importlib.import_module(RECIPES[name])
