"""The recipe table: one module per algorithm, each with a typed `Config` and `main(cfg)`.

The CLI and the demo both look recipes up here. Modules are imported on demand (a recipe pulls
in its own heavy dependencies, e.g. diffusers for `draftp`), so `alignkit ls` stays fast.
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType

from alignkit.config import ConfigError

__all__ = ["RECIPES", "recipe_module"]

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
    "draftp": "alignkit.recipes.draftp",
}


def recipe_module(name: str) -> ModuleType:
    """The recipe's module; an unknown name fails with the nearest valid one."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint} (recipes: {', '.join(RECIPES)})")
    return importlib.import_module(RECIPES[name])
