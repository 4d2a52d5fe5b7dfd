"""training/loop.py in process, on a linear model: the optimizer step's normalisation, the end of a
step (logging, evaluation, checkpoints, non-finite values), resume and the iterated runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from alignkit.config import ConfigError, ModelConfig, OptimConfig, RandomInitConfig, RecipeConfig
from alignkit.training.loop import (
    finish_step,
    iteration_run,
    optimizer_step,
    reduce_metrics,
    resume,
    start_run,
    to_device,
)
from alignkit.training.optim import build_optimizer, build_scheduler


def _cfg(tmp_path, **train) -> RecipeConfig:
    return RecipeConfig(
        output_dir=str(tmp_path),
        model=ModelConfig(random_init=RandomInitConfig()),
        optim={"lr": 0.1, "schedule": "constant", "weight_decay": 0.0, "grad_clip": None},
        train={"log_every": 2, "eval_every": 3, **train},
        checkpoint={"every": 4, "keep_last": 5},
        logging={"tensorboard": False, "progress": "none"},
    )


def _batch(x: list[float], y: list[float]) -> dict:
    return {"x": torch.tensor(x)[:, None], "y": torch.tensor(y)[:, None], "num_units": len(x), "num_tokens": len(x)}


def _squared_error(model, batch):
    """Sums over the batch, as every alignkit loss does: the loop divides by the global count."""
    err = (model(batch["x"]) - batch["y"]).pow(2).sum()
    return err, {"loss": err.detach()}


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(1, 1)


def test_one_big_batch_equals_any_micro_batching(tmp_path):
    """4 examples in one micro-batch or in micro-batches of 1 and 3: the loss is a sum normalised by
    the step's 4 units, so the gradients, the updated weights and the metric sums are the same."""
    run = start_run(_cfg(tmp_path))
    x, y = [1.0, 2.0, -1.0, 0.5], [2.0, 3.0, 0.0, 1.0]
    results = []
    for batches in ([_batch(x, y)], [_batch(x[:1], y[:1]), _batch(x[1:], y[1:])]):
        model = _linear()
        sums, units, tokens, _ = optimizer_step(
            run, model, torch.optim.SGD(model.parameters(), lr=0.1), batches, _squared_error
        )
        results.append((model.weight.item(), model.bias.item(), float(sums["loss"]), units))
    assert results[0] == pytest.approx(results[1], rel=1e-6)
    assert results[0][3] == 4


def test_reduce_metrics_divides_sums_by_the_units(tmp_path):
    run = start_run(_cfg(tmp_path))
    assert reduce_metrics({"loss": torch.tensor(6.0), "n": torch.tensor(2.0)}, 4.0, run.dist) == {"loss": 1.5, "n": 0.5}
    assert reduce_metrics({}, 4.0, run.dist) == {}


def test_to_device_moves_tensors_and_keeps_the_rest():
    batch = to_device({"ids": torch.ones(2), "order": [1, 0], "num_units": 3}, torch.device("cpu"))
    assert batch["order"] == [1, 0] and batch["num_units"] == 3 and isinstance(batch["ids"], torch.Tensor)


def _parts(model):
    optim = OptimConfig(lr=0.1, schedule="constant", weight_decay=0.0)
    optimizer = build_optimizer(model, optim)
    return {"model": (model, optimizer, build_scheduler(optimizer, 10, optim))}


def test_finish_step_logs_when_due_evaluates_between_and_checkpoints(tmp_path):
    """10 steps, log_every 2, eval_every 3, checkpoint.every 4: rows at steps 2, 4, ..., 10; val rows
    at 3, 6, 9 (not 10: the caller evaluates the final model); checkpoints at 4 and 8 (not 10)."""
    run = start_run(_cfg(tmp_path))
    parts = _parts(_linear())
    start, extra, logger = resume(run, parts, 10)
    assert (start, extra) == (0, {})
    evaluated = []
    for step in range(10):
        finish_step(
            run,
            logger,
            step,
            {"loss": float(step)},
            parts,
            {"beta": step},
            10,
            evaluate=lambda s=step: evaluated.append(s + 1) or {"val/loss": 0.0},
        )
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10]
    assert evaluated == [3, 6, 9]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_4", "step_8"]


def test_resume_restores_the_newest_checkpoint_and_its_extra_state(tmp_path):
    run = start_run(_cfg(tmp_path))
    model = _linear()
    parts = _parts(model)
    _, _, logger = resume(run, parts, 10)
    for step in range(4):
        finish_step(run, logger, step, {"loss": 1.0}, parts, {"kl_coef": 0.5}, 10)
    logger.close()
    weight = model.weight.detach().clone()
    fresh = _parts(nn.Linear(1, 1))
    start, extra, logger = resume(run, fresh, 10)
    logger.close()
    assert (start, extra) == (4, {"kl_coef": 0.5})
    torch.testing.assert_close(fresh["model"][0].weight, weight)


def test_finish_step_names_non_finite_metrics(tmp_path):
    run = start_run(_cfg(tmp_path))
    parts = _parts(_linear())
    _, _, logger = resume(run, parts, 10)
    with pytest.raises(FloatingPointError, match=r"step 1: non-finite grad_norm=nan"):
        finish_step(run, logger, 0, {"loss": 1.0, "grad_norm": float("nan")}, parts, {}, 10)
    logger.close()


def test_iteration_run_trains_from_the_previous_iteration_and_skips_finished_ones(tmp_path):
    run = start_run(_cfg(tmp_path))
    first = iteration_run(run, 1)
    assert first.output_dir == tmp_path / "iteration_1" and first.cfg.model.random_init is not None
    second = iteration_run(run, 2)
    assert second.cfg.model.path == str(tmp_path / "iteration_1" / "final")
    assert second.cfg.model.random_init is None
    (tmp_path / "iteration_1" / "final").mkdir(parents=True)
    (tmp_path / "iteration_1" / "final" / "config.json").write_text("{}")
    assert iteration_run(run, 1) is None  # done earlier: a resumed recipe skips it


def test_a_run_resumes_only_under_the_config_that_wrote_its_checkpoints(tmp_path):
    """Rerunning into a used output_dir with another learning rate would continue the old run under
    a config.yaml that claims the new one: it stops, naming the key and the ways out, and leaves the
    old config.yaml. Safe keys (how long it runs, logging, checkpointing) may change."""
    first = _cfg(tmp_path)
    start_run(first)
    (tmp_path / "checkpoints" / "step_4").mkdir(parents=True)
    saved = (tmp_path / "config.yaml").read_text()
    changed = first.model_copy(update={"optim": first.optim.model_copy(update={"lr": 0.01})})
    with pytest.raises(ConfigError, match=r"optim\.lr \(0\.1 -> 0\.01\).*new output_dir.*checkpoint\.resume=false"):
        start_run(changed)
    assert (tmp_path / "config.yaml").read_text() == saved
    longer = first.model_copy(update={"train": first.train.model_copy(update={"max_steps": 50, "log_every": 5})})
    start_run(longer)
    fresh = changed.model_copy(update={"checkpoint": changed.checkpoint.model_copy(update={"resume": False})})
    assert start_run(fresh).cfg.optim.lr == 0.01


def test_a_setting_added_since_the_run_started_resumes_at_its_default(tmp_path):
    """A run killed under an older alignkit resumes under a newer one: a key its config.yaml lacks
    is no change while it keeps its default, and is one when set to something else."""
    import yaml

    first = _cfg(tmp_path)
    start_run(first)
    (tmp_path / "checkpoints" / "step_4").mkdir(parents=True)
    older = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del older["train"]["seed"]  # as if the setting did not exist when the run started
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    start_run(first)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    changed = first.model_copy(update={"train": first.train.model_copy(update={"seed": 5})})
    with pytest.raises(ConfigError, match=r"train\.seed \(None -> 5\)"):
        start_run(changed)


def test_the_chat_template_trained_with_is_saved_with_the_model(tmp_path, tokenizer):
    """A base model without a template, fine-tuned with `data.chat_template`: final/ carries that
    template, so scoring, serving and the next recipe render conversations as in training."""
    from transformers import AutoTokenizer

    from alignkit.recipes.sft import Config as SFTConfig
    from alignkit.training.loop import save_final
    from tests.conftest import tiny_model

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    cfg = SFTConfig(
        output_dir=str(tmp_path),
        model={"random_init": {}},
        data={"train": {"path": "x.jsonl"}, "chat_template": template},
    )
    run = start_run(cfg)
    own = tokenizer.chat_template
    save_final(run, tiny_model(tokenizer), tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path / "final").chat_template == template
    assert tokenizer.chat_template == own
