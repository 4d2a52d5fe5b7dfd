"""Reward models: Bradley-Terry ranking (plain, margin, scaled) and SteerLM attribute regression.

A reward model is the policy's backbone with a linear head on the hidden state of the
response's last token (InstructGPT, Ouyang et al. 2022, step 2). Two ways to train it:

  bt, margin_bt, scaled_bt   preference pairs: sigma(r_chosen - r_rejected) models
                             P(chosen > rejected) (Bradley and Terry 1952); the margin and scaled
                             variants are NeMo-Aligner's HelpSteer2-Preference losses (Wang et al.
                             2024) and read the pair's `margin` field. A scalar head.
  regression                 responses labelled with attributes (0-4 in HelpSteer): one head
                             output per attribute, masked MSE over the labelled ones (the SteerLM
                             attribute model, Dong et al. 2023). The scalar reward of a
                             regression model is w . a (`loss.reward_weights`, default equal).

After training, the recipe scores the training responses once to record the reward's mean and
standard deviation (for standardised rewards in RL), evaluates the validation set exactly
(pairwise accuracy; per-attribute Pearson r, MAE and RMSE), writes `eval.json`, and saves
`final/` as an `AutoModelForSequenceClassification` directory with the attribute names and the
statistics in its config (see `alignkit.models.reward`).

    alignkit run reward_model --config tiny
    alignkit run reward_model --config tiny_regression
    alignkit run reward_model --config my.yaml model.path=runs/sft/final loss.type=margin_bt --nproc 8
    alignkit score --model runs/rm_tiny/final --data pairs.jsonl
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from transformers import AutoModelForSequenceClassification

from alignkit.config import ConfigError, DataConfig, RecipeConfig, Section
from alignkit.data.batching import pack_examples
from alignkit.data.io import DataError
from alignkit.data.reward import (
    AttributeExample,
    RewardPair,
    collate_attribute_rows,
    collate_reward_pairs,
    load_attribute_examples,
    load_reward_pairs,
)
from alignkit.losses.reward import bradley_terry_loss, regression_loss
from alignkit.models.loading import load_sequence_scorer, load_tokenizer
from alignkit.models.reward import RewardModelInfo, init_head_to_mean, score_head, score_sequences, sequence_scores
from alignkit.training.distributed import score_sharded
from alignkit.training.loop import fit, save_final, start_run

__all__ = ["Config", "RewardLossConfig", "Task", "main", "pairwise_task", "regression_task"]

HELPSTEER_ATTRIBUTES = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


class RewardLossConfig(Section):
    type: Literal["bt", "margin_bt", "scaled_bt", "regression"] = "bt"
    # regression: the attributes the head predicts, in order (default: HelpSteer's five).
    attributes: list[str] | None = None
    # regression: weights of the scalar reward w . a, one per attribute (default 1/A each).
    reward_weights: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> RewardLossConfig:
        if self.type != "regression" and (self.attributes or self.reward_weights):
            raise ValueError("loss.attributes and loss.reward_weights are for loss.type=regression")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.names):
            raise ValueError(
                f"loss.reward_weights has {len(self.reward_weights)} values for "
                f"{len(self.names)} attributes ({', '.join(self.names)})"
            )
        return self

    @property
    def names(self) -> list[str]:
        if self.type != "regression":
            return ["reward"]
        return list(self.attributes or HELPSTEER_ATTRIBUTES)

    @property
    def weights(self) -> list[float]:
        return list(self.reward_weights or [1.0 / len(self.names)] * len(self.names))


class Config(RecipeConfig):
    data: DataConfig
    loss: RewardLossConfig = RewardLossConfig()
    # Training sequences scored after training for the reward's mean and std (0: no statistics).
    normalization_samples: int = Field(1024, ge=0)
    # regression: start a new head at the training labels' means (see models.reward.init_head_to_mean).
    init_head_to_mean: bool = True


# --- losses on one micro-batch -------------------------------------------------------------


def pair_loss(model, batch, loss_type: str):
    """Bradley-Terry over the pairs of a micro-batch; sums (the loop divides by the pair count)."""
    rewards = sequence_scores(model, batch["input_ids"], batch["position_ids"], batch["ends"])[:, 0]  # (2P,)
    chosen, rejected = rewards[0::2], rewards[1::2]  # (P,)
    margin = batch["margin"].to(rewards.device)
    loss, metrics = bradley_terry_loss(
        chosen,
        rejected,
        margin=margin if loss_type == "margin_bt" else None,
        scale=margin if loss_type == "scaled_bt" else None,
    )
    metrics["rewards/mean_sq"] = (chosen.detach().float() ** 2 + rejected.detach().float() ** 2).sum() / 2
    return loss, metrics


def attribute_loss(model, batch):
    """Masked squared error over the labelled attributes; sums (normalised by labelled entries)."""
    predicted = sequence_scores(model, batch["input_ids"], batch["position_ids"], batch["ends"])  # (S, A)
    return regression_loss(predicted, batch["targets"].to(predicted.device), batch["mask"].to(predicted.device))


def summarize_pairs(metrics: dict[str, float]) -> dict[str, float]:
    """Adds rewards/std (over chosen and rejected) from the first and second moments."""
    out = dict(metrics)
    if "rewards/mean_sq" in out:
        mean = (out.get("rewards/chosen", 0.0) + out.get("rewards/rejected", 0.0)) / 2
        out["rewards/std"] = math.sqrt(max(out.pop("rewards/mean_sq") - mean**2, 0.0))
    return out


def summarize_attributes(metrics: dict[str, float], names: list[str]) -> dict[str, float]:
    """mse/<i> and count/<i> (both per labelled entry) -> mse/<name>, attribute i's own MSE."""
    out = {k: v for k, v in metrics.items() if not k.startswith(("mse/", "count/"))}
    for i, name in enumerate(names):
        count = metrics.get(f"count/{i}", 0.0)
        if count > 0:
            out[f"mse/{name}"] = metrics[f"mse/{i}"] / count
    return out


# --- exact scoring of whole datasets (all processes share the work) ------------------------


def _predict(run, cfg: Config, model, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """(N, A) scores of every sequence, scored in shares over processes."""
    d = run.dist
    batch = cfg.train.micro_batch_size * 2
    # Under FSDP every forward is a collective: every process makes the same number of calls.
    most = math.ceil(math.ceil(len(sequences) / d.dp_size) / batch)
    return score_sharded(
        len(sequences),
        len(cfg.loss.names),
        d,
        lambda mine: score_sequences(
            model, [sequences[i] for i in mine], pad_id, batch, d.device, run.autocast, min_batches=most
        ),
    )


def _pair_sequences(pairs: list[RewardPair]) -> list[list[int]]:
    return [s.input_ids for p in pairs for s in (p.chosen, p.rejected)]


def pairwise_report(rewards: torch.Tensor) -> dict[str, float]:
    """Exact metrics of (P, 2) [chosen, rejected] rewards."""
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    return {
        "pairwise_accuracy": float((chosen > rejected).double().mean()),
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/margin": float((chosen - rejected).mean()),
        "rewards/std": float(rewards.std()),
        "pairs": len(rewards),
    }


def attribute_report(predicted: torch.Tensor, examples: list[AttributeExample], names: list[str]) -> dict[str, float]:
    """Per attribute, over the labelled examples: Pearson r, MAE and RMSE of the predictions."""
    targets = torch.tensor([e.targets for e in examples], dtype=torch.float64)  # (N, A), NaN = missing
    out: dict[str, float] = {"examples": len(examples)}
    for i, name in enumerate(names):
        present = ~torch.isnan(targets[:, i])
        p, t = predicted[present, i].double(), targets[present, i]
        if len(t) < 2:
            continue
        err = p - t
        out[f"mae/{name}"] = float(err.abs().mean())
        out[f"rmse/{name}"] = float(err.pow(2).mean().sqrt())
        r = torch.corrcoef(torch.stack([p, t]))[0, 1]
        out[f"pearson/{name}"] = float(r) if torch.isfinite(r) else 0.0
    return out


# --- the two kinds of reward model -----------------------------------------------------------


@dataclass
class Task:
    """What differs between a pairwise (Bradley-Terry) and an attribute-regression reward model:
    the items `fit` trains on, and the sequences scored for the statistics and the report."""

    train_items: list
    eval_items: list | None
    item_length: Callable[[Any], int]
    collate: Callable[[list], dict]
    loss_fn: Callable
    summarize: Callable[[dict[str, float]], dict[str, float]]
    statistics_sequences: list[list[int]]  # training responses scored for the reward's mean and std
    validation_sequences: list[list[int]]
    report: Callable[[torch.Tensor], dict[str, float]]  # (N, A) validation scores -> eval.json


def pairwise_task(run, cfg: Config, tokenizer) -> Task:
    """Bradley-Terry (plain, margin, scaled) on preference pairs; a scalar head."""
    datasets = {}
    for name, spec in (("train", cfg.data.train), ("validation", cfg.data.validation)):
        if spec is not None:
            datasets[name], stats = load_reward_pairs(spec, cfg.data, tokenizer)
            if cfg.loss.type != "bt" and (bad := next((p for p in datasets[name] if p.margin is None), None)):
                raise DataError(f"{bad.chosen.source}: loss.type={cfg.loss.type} needs a 'margin' field in every pair")
            run.log.info(f"{name} data {spec.path}: {stats.summary().replace('examples', 'pairs')}")
    train, val = _require_train(datasets, cfg), datasets.get("validation")
    return Task(
        train_items=train,
        eval_items=val,
        item_length=lambda p: len(p.chosen.input_ids) + len(p.rejected.input_ids),
        collate=partial(collate_reward_pairs, pad_id=tokenizer.pad_token_id),
        loss_fn=partial(pair_loss, loss_type=cfg.loss.type),
        summarize=summarize_pairs,
        statistics_sequences=_pair_sequences(train[: max(1, cfg.normalization_samples // 2)]),
        validation_sequences=_pair_sequences(val or []),
        report=lambda scores: pairwise_report(scores.reshape(-1, 2)),
    )


def regression_task(run, cfg: Config, tokenizer, model) -> Task:
    """SteerLM attribute regression on labelled responses, packed into rows when `data.pack`; a
    new head starts at the labels' means (`init_head_to_mean`)."""
    names, datasets = cfg.loss.names, {}
    for name, spec in (("train", cfg.data.train), ("validation", cfg.data.validation)):
        if spec is not None:
            datasets[name], stats = load_attribute_examples(spec, cfg.data, tokenizer, names)
            run.log.info(f"{name} data {spec.path}: {stats.summary()}")
    train, val = _require_train(datasets, cfg), datasets.get("validation")
    if _new_head(run, cfg, model) and cfg.init_head_to_mean:
        _init_head(run, model, train[:256], tokenizer.pad_token_id)
    by_id = {id(e.example): e for split in datasets.values() for e in split}

    def rows(examples: list[AttributeExample]) -> list[list[AttributeExample]]:
        if not cfg.data.pack:
            return [[e] for e in examples]
        return [
            [by_id[id(x)] for x in row] for row in pack_examples([e.example for e in examples], cfg.data.max_seq_len)
        ]

    return Task(
        train_items=rows(train),
        eval_items=rows(val) if val is not None else None,
        item_length=lambda row: sum(len(e.example.input_ids) for e in row),
        collate=partial(collate_attribute_rows, pad_id=tokenizer.pad_token_id),
        loss_fn=attribute_loss,
        summarize=partial(summarize_attributes, names=names),
        statistics_sequences=[e.example.input_ids for e in train[: cfg.normalization_samples]],
        validation_sequences=[e.example.input_ids for e in val or []],
        report=lambda scores: attribute_report(scores, val, names),
    )


def _require_train(datasets: dict[str, list], cfg: Config) -> list:
    if not datasets["train"]:
        raise ConfigError(f"no training data left after data.overlength={cfg.data.overlength}")
    return datasets["train"]


def _new_head(run, cfg: Config, model) -> bool:
    new = not any(p.any() for p in score_head(model).parameters())  # new heads start at zero
    run.log.info(
        f"reward head: {len(cfg.loss.names)} output(s) ({', '.join(cfg.loss.names)}), "
        + ("new, zero-initialised" if new else f"loaded from {cfg.model.path}")
    )
    return new


def _init_head(run, model, sample: list[AttributeExample], pad_id: int) -> None:
    """Start the new head at the labels' mean: only the variation is left to learn."""
    targets = torch.tensor([e.targets for e in sample])  # (N, A), NaN = missing
    mean = torch.nan_to_num(targets.nanmean(0), nan=0.0)
    spread = init_head_to_mean(model, [e.example.input_ids for e in sample], pad_id, mean)
    run.log.info(
        f"regression head initialised to the label means ({', '.join(f'{m:.2f}' for m in mean)}); "
        f"initial prediction spread {spread:.2g} of the mean"
    )


# --- the recipe ---------------------------------------------------------------------------


def main(cfg: Config) -> None:
    run = start_run(cfg)
    lc = cfg.loss

    # --- model and data ---------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    model = load_sequence_scorer(cfg.model, tokenizer, num_labels=len(lc.names), seed=cfg.train.seed)
    if lc.type == "regression":
        task = regression_task(run, cfg, tokenizer, model)
    else:
        task = pairwise_task(run, cfg, tokenizer)
        _new_head(run, cfg, model)

    # --- train: minimise the ranking or regression loss -------------------------------------
    model = fit(
        run,
        model,
        task.train_items,
        task.item_length,
        task.collate,
        task.loss_fn,
        task.eval_items,
        task.summarize,
        tensor_parallel=True,  # every split of work goes by data-parallel rank (fit, _predict)
    )

    # --- reward statistics on training responses, exact validation report -------------------
    info = RewardModelInfo(lc.names, lc.weights)
    if cfg.normalization_samples > 0:
        rewards = info.reward(_predict(run, cfg, model, task.statistics_sequences, pad_id).float())
        info.mean, info.std = float(rewards.mean()), float(rewards.std()) if len(rewards) > 1 else 1.0
        info.std = info.std if info.std > 1e-6 else 1.0
        run.log.info(
            f"reward statistics over {len(rewards)} training responses: mean {info.mean:.4g}, std {info.std:.4g}"
        )
    report: dict = {"reward_mean": info.mean, "reward_std": info.std}
    if task.eval_items is not None:
        report.update(task.report(_predict(run, cfg, model, task.validation_sequences, pad_id)))
        run.log.info("validation: " + ", ".join(f"{k}={v:.4g}" for k, v in report.items()))
    if run.dist.is_main:
        (run.output_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")

    # --- save as an AutoModelForSequenceClassification directory -----------------------------
    if cfg.checkpoint.save_final:
        save_final(run, model, tokenizer, info.config_updates(), AutoModelForSequenceClassification)
