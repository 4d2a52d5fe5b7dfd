"""Every shipped YAML config validates against its recipe's config class (unknown keys, types)."""

from __future__ import annotations

import pytest
import yaml

from alignkit.config import configs_dir, load_config
from alignkit.recipes import RECIPES, recipe_module

SHIPPED = sorted(configs_dir().glob("*/*.yaml"))


def test_every_recipe_ships_a_tiny_config():
    assert {p.parent.name for p in SHIPPED if p.stem == "tiny"} >= set(RECIPES)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_config_validates(path):
    recipe = yaml.safe_load(path.read_text()).get("recipe") or path.parent.name
    assert recipe in RECIPES, f"{path}: unknown recipe {recipe!r}"
    cfg = load_config(recipe_module(recipe).Config, path)
    assert cfg.output_dir
