"""What the demo's stages share: the `Demo` a stage sees and its `Stage` entry in the table, running
a recipe from configs/demo/, evaluating a stage's final model on the held-out prompts (paired with
a reference stage), reading a metrics log."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.config import RecipeConfig, Section, find_config, load_config
from alignkit.evaluation.evaluate import evaluate_model, write_json
from alignkit.evaluation.stats import mean_with_ci
from alignkit.recipes import recipe_module

__all__ = ["Demo", "Stage", "evaluate", "read_jsonl", "train", "train_on_ray"]


@dataclass
class Demo:
    """What a stage sees: the output folder, the settings, and the stages decided so far."""

    root: Path
    settings: Section
    fingerprints: dict[str, str]
    results: dict[str, dict[str, Any]]

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def eval_prompts(self) -> list[dict[str, Any]]:
        lines = self.path("data", "eval_prompts.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Demo], dict[str, Any]]
    needs: tuple[str, ...]
    configs: tuple[str, ...] = ()  # configs/demo/NAME.yaml, part of the fingerprint
    settings: tuple[str, ...] = ()  # sections of the demo's settings it reads, part of the fingerprint
    is_model: bool = False  # a generative model: evaluated on the held-out prompts, in the table
    in_summary: bool = False  # a stage that is not a generative model but reports metrics (reward models)


def train(
    demo: Demo, stage: str, overrides: list[str], config: str | None = None, output: Path | None = None
) -> RecipeConfig:
    """Run the recipe named in configs/demo/CONFIG.yaml (default: the stage's name) in this process;
    returns its resolved config."""
    path = find_config("demo", config or stage)
    module = recipe_module(config_recipe(path))
    cfg = load_config(
        module.Config, path, [f"output_dir={output or demo.path(stage)}", "logging.progress=lines", *overrides]
    )
    module.main(cfg)
    return cfg


def train_on_ray(demo: Demo, stage: str, overrides: list[str], config: str | None = None) -> RecipeConfig:
    """As `train`, with the recipe's one rank and the roles its `placement` section asks for
    placed by Ray on a local cluster (what `alignkit run ... --launcher ray` does)."""
    from alignkit.training.launch import ray_launch  # local: Ray for this stage only
    from alignkit.training.placement import placed_roles

    path = find_config("demo", config or stage)
    recipe = config_recipe(path)
    args = [f"output_dir={demo.path(stage)}", "logging.progress=lines", *overrides]
    cfg = load_config(recipe_module(recipe).Config, path, args)  # bad settings fail here, before Ray starts
    code, errors = ray_launch(1, _rank_train, (recipe, str(path), args), None, (), placed_roles(cfg))
    if code:
        raise RuntimeError(f"stage {stage}: {errors[0] if errors else 'failed'}")
    return cfg


def _rank_train(recipe: str, path: str, args: list[str]) -> None:
    """The rank of `train_on_ray`: the recipe in the Ray actor."""
    from alignkit.training.distributed import shutdown

    module = recipe_module(recipe)
    module.main(load_config(module.Config, Path(path), args))
    shutdown()


def config_recipe(path: Path) -> str:
    return yaml.safe_load(path.read_text())["recipe"]


def evaluate(
    demo: Demo, stage: str, reference: str | None = None, attributes: dict[str, int] | None = None
) -> dict[str, Any]:
    prompts = demo.eval_prompts()
    reference_rewards = None
    if reference is not None:
        reference_rewards = json.loads(demo.path(reference, "eval.json").read_text())["rewards"]
    result = evaluate_model(
        demo.path(stage, "final"),
        prompts,
        demo.settings.evaluation.sampling,
        reference_dir=demo.path(reference, "final") if reference else None,
        reference_name=reference or "reference",
        reference_rewards=reference_rewards,
        attributes=attributes,
    )
    write_json({**result.to_json(prompts), "rewards": result.rewards}, demo.path(stage, "eval.json"))
    if reference is not None:  # paired on the same prompts: far tighter than comparing two means' CIs
        reference_items = json.loads(demo.path(reference, "eval.json").read_text())["items"]
        result.metrics.update(
            mean_with_ci(f"reward_gain_vs_{reference}", [a - b for a, b in zip(result.rewards, reference_rewards)])
        )
        result.metrics.update(
            mean_with_ci(
                f"correctness_gain_vs_{reference}",
                [
                    float(a["correctness"] == 4) - float(b["correctness"] == 4)
                    for a, b in zip(result.scores, reference_items)
                ],
            )
        )
    return result.metrics


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
