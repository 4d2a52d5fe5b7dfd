"""The end-to-end demo: the task world, a home-grown base model, and each alignment stage.

    alignkit demo [--stages data,tokenizer,base,sft|all] [--output-dir runs/demo]

Stages run in order, each in its own folder under the output directory, and are reused while
their inputs are unchanged (`pipeline`). Model stages are evaluated on the same held-out prompts
with the same sampling, so win rates compare responses to identical prompts (`stages`). The demo
ends with a table, `report.md`, plots (`report`), and `summary.json` mapping each model stage to
its metrics. The settings the stages read (evaluation sampling, dataset sizes, the reward model's
on-policy comparisons, SteerLM's targets, DRaFT+'s evaluation) are in configs/demo.yaml; each
stage's recipe config is configs/demo/STAGE.yaml.
"""

from alignkit.demo.common import Demo, Stage
from alignkit.demo.pipeline import run_pipeline
from alignkit.demo.stages import DEFAULT_STAGES, DEMO_VERSION, STAGES, DemoConfig, run_demo

__all__ = ["DEFAULT_STAGES", "DEMO_VERSION", "STAGES", "Demo", "DemoConfig", "Stage", "run_demo", "run_pipeline"]
