"""SteerLM 2.0: iterative, importance-weighted attribute-conditioned SFT (Wang et al. 2024,
"HelpSteer2-Preference" / SteerLM 2.0; NeMo-Aligner's `train_steerlm2.py`).

SteerLM fits Q(y | a, x) to whatever responses carry label a. SteerLM 2.0 fits it to the ideal
P(y | a, x) ∝ P(a | x, y) P(y | x): responses the unconditioned model finds likely AND the
attribute model judges to have attributes a. It minimises KL(P || Q_theta) with samples of the
SteerLM model Q'. Per iteration t = 1..T:

    1. Q' (the current model) samples n = `sampling.n` responses y_1..y_n for every (prompt x, target
       attributes a), with the shared sampling loop (`alignkit.generation.batches.sample_batches`)
    2. log P(a | x, y_i): the attribute model's likelihood of the targets (a discretised Gaussian
       around each predicted score, `losses.steerlm.attribute_log_likelihood`);
       log P(y_i | x): the unconditioned SFT model (`steerlm2.prior_path`);
       log Q'(y_i | a, x): the sampling model, on the conditioned prompt
    3. train Q_theta (from Q') on  L = sum_i (w'_i - b'_i) NLL_theta(y_i) / mean tokens  with
       w' = softmax(log P(a|x,y) + log P(y|x) - log Q'),  b' = softmax(log Q_theta - log Q')
       (b' from the current policy at every step; `losses.steerlm.steerlm2_loss`)
    4. the result is the next iteration's Q'

Prompts (`data.train`): records with "prompt" and target `attributes` (an object or a label;
attributes left out take the SteerLM model's defaults). Each iteration lives in
`output_dir/iteration_t/` (samples.jsonl with every log-probability, in NeMo-Aligner's SteerLM2
layout, then the training run), so a killed run resumes where it stopped. Rollout metrics go to
`output_dir/metrics.jsonl`; training logs `loss` and `distance` = sum_i w'_i log(w'_i / b'_i).

    alignkit run steerlm2 --config tiny
    alignkit run steerlm2 --config my.yaml model.path=runs/steerlm/final \\
        steerlm2.prior_path=runs/sft/final attribute_model.path=runs/rm/attributes/final
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from pydantic import Field, model_validator

from alignkit.config import ConfigError, DataConfig, ModelConfig, RecipeConfig, SamplingConfig, Section
from alignkit.data.batching import collate_groups
from alignkit.data.formats import prompt_messages, read_prompt_records
from alignkit.data.io import DataError, Record, write_jsonl
from alignkit.data.steerlm import LabelError, SteerLMFormat, steered_prompt
from alignkit.data.tokenize import IGNORE, Example
from alignkit.generation.batches import sample_batches
from alignkit.generation.engine import build_engine
from alignkit.losses.steerlm import attribute_log_likelihood, steerlm2_loss
from alignkit.models.forward import logits_at, sequence_logps
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.rewards import RewardSourceConfig, build_reward_source
from alignkit.training.distributed import barrier, gather_rollouts
from alignkit.training.loop import (
    Run,
    copy_last_iteration,
    fit,
    iteration_logger,
    iteration_run,
    save_final,
    start_run,
    to_device,
)

__all__ = ["Config", "SteerLM2Config", "main"]


class SteerLM2Config(Section):
    prior_path: str  # the unconditioned SFT model: log P(y | x)
    iterations: int = Field(1, ge=1)
    attribute_sigma: float = Field(0.5, gt=0)  # the attribute likelihood's width (levels)
    # The attributes whose likelihood enters log P(a|x,y) (default: every attribute of the label).
    # Leaving one out treats it as uninformative: a small model's correctness, say, can dominate
    # the weights (a 4-level miss costs 32 nats at sigma 0.5) and drown the attributes being steered.
    likelihood_attributes: list[str] | None = None
    score_batch_size: int = Field(32, ge=1)  # sequences per no-grad forward for log Q' and log P(y|x)


class Config(RecipeConfig):
    data: DataConfig  # data.train: prompt records with target `attributes` (object or label)
    attribute_model: RewardSourceConfig  # a source that returns attribute scores (model, http, oracle...)
    steerlm2: SteerLM2Config
    # n = `sampling.n` >= 2 samples per target: the weights are a softmax over them. Q' must be sampled
    # as is (temperature 1, no top-k/top-p) for the importance weights to hold.
    sampling: SamplingConfig = SamplingConfig(n=4)

    @model_validator(mode="after")
    def _groups_of_two(self) -> Config:
        if self.sampling.n < 2:
            raise ValueError(
                f"sampling.n={self.sampling.n}: SteerLM 2.0's weights are a softmax over the n samples "
                "of a target; use >= 2"
            )
        return self


@dataclass
class Group:
    """One (prompt, target attributes) and its n samples; the constants of the loss."""

    conditioned: list[Example]  # (n) [prompt + label line | response], targets on the response
    initial_logps: list[float]  # log Q'(y_i | a, x)
    attribute_logps: list[float]  # log P(a | x, y_i)
    prior_logps: list[float]  # log P(y_i | x)


# --- token sequences and their log-probabilities -----------------------------------------------


def _example(prompt_ids: list[int], response_ids: list[int], where: str) -> Example:
    """[prompt | response] with shifted targets on the response tokens (as sampled, EOS included)."""
    return Example(prompt_ids + response_ids, [IGNORE] * (len(prompt_ids) - 1) + response_ids + [IGNORE], where)


def collate(groups: list[Group | None], pad_id: int) -> dict[str, Any]:
    """Micro-batch of groups: their sequences packed row by row (`collate_groups`), plus, for the
    G real groups in packed order, `seq_index`/`seq_num_targets` and the (G, n) loss constants."""
    batch = collate_groups([g.conditioned if g is not None else None for g in groups], pad_id)
    real = [groups[i] for i in batch["order"]]
    batch["num_units"] = len(real)
    batch["seq_num_targets"] = batch["seq_num_targets"].reshape(len(real), -1)  # (G, n)
    for key in ("initial_logps", "attribute_logps", "prior_logps"):
        batch[key] = torch.tensor([getattr(g, key) for g in real], dtype=torch.float64)
    return batch


def group_logps(model, batch) -> torch.Tensor:
    """(G, n) summed response log-probs of every sequence in the batch."""
    select = batch["target_ids"] != IGNORE  # (B, T)
    logits = logits_at(model, batch["input_ids"], batch["position_ids"], select)  # (N, V)
    counts = batch["seq_num_targets"]
    return sequence_logps(logits, batch["target_ids"][select], batch["seq_index"], counts.numel()).reshape(counts.shape)


@torch.no_grad()
def _score(run: Run, model, sequences: list[list[Example]], pad_id: int, batch_size: int) -> list[list[float]]:
    """Summed response log-probs of each group's sequences (no grad), in input order."""
    out: list[list[float]] = [[] for _ in sequences]
    per_batch = max(1, batch_size // max(len(sequences[0]), 1)) if sequences else 1
    model.eval()
    for start in range(0, len(sequences), per_batch):
        chunk = sequences[start : start + per_batch]
        batch = collate_groups(chunk, pad_id)
        batch["seq_num_targets"] = batch["seq_num_targets"].reshape(len(chunk), -1)  # (G, n)
        batch = to_device(batch, run.dist.device)
        with run.autocast():
            logps = group_logps(model, batch).double().cpu()
        for row, i in enumerate(batch["order"]):
            out[start + i] = logps[row].tolist()
    model.train()
    return out


# --- 1-2: sample from Q', then the three log-probabilities --------------------------------------


def _targets(fmt: SteerLMFormat, record: Record) -> dict[str, int]:
    try:
        return fmt.targets(record.data.get("attributes", record.data.get("label")))
    except LabelError as exc:
        raise DataError(f"{record.source}: {exc}") from None


def _attribute_logps(scored, names: list[str], targets: list[dict[str, int]], n: int, sigma: float):
    """(G, n) log P(a | x, y_i) of each group's targets over `names`, and the (G*n, A) predicted and
    wanted levels (for the match metric)."""
    missing = [a for a in names if a not in scored.names]
    if scored.attributes is None or missing:
        raise ConfigError(
            f"the attribute model returns attributes {scored.names or 'none'}; the likelihood needs {missing or names}"
        )
    predicted = scored.attributes[:, [scored.names.index(a) for a in names]]  # (G*n, A)
    wanted = torch.tensor([[t[a] for a in names] for t in targets]).repeat_interleave(n, 0)  # (G*n, A)
    return attribute_log_likelihood(predicted, wanted, sigma).view(len(targets), n), predicted, wanted


def sample_groups(
    run: Run,
    cfg: Config,
    model,
    prior,
    tokenizer,
    fmt: SteerLMFormat,
    records: list[Record],
    attribute_model,
    iteration: int,
) -> tuple[list[dict], dict[str, float]]:
    """This process's share of the prompts: n samples each with all three log-probabilities, as
    sample records, and summed rollout statistics."""
    s2, d, n = cfg.steerlm2, run.dist, cfg.sampling.n
    mine = list(range(d.rank, len(records), d.world_size))
    share = [records[i] for i in mine]
    messages = [prompt_messages(r) for r in share]
    prompts = [r.data["prompt"] if "prompt" in r.data else m for r, m in zip(share, messages)]
    targets = [_targets(fmt, r) for r in share]
    # Q' answers the steered prompt (label line included); P(y|x) reads the same answer after the plain one.
    template = cfg.data.chat_template
    steered = tokenizer(
        [steered_prompt(tokenizer, m, fmt, t, template, r.source) for m, t, r in zip(messages, targets, share)],
        add_special_tokens=False,
    )["input_ids"]
    plain = tokenizer(
        [steered_prompt(tokenizer, m, None, None, template, r.source) for m, r in zip(messages, share)],
        add_special_tokens=False,
    )["input_ids"]
    # A batch's seed follows the iteration and its first prompt's index in the dataset.
    base = (cfg.train.seed if cfg.sampling.seed is None else cfg.sampling.seed) + 100_003 * iteration
    names = s2.likelihood_attributes or list(fmt.attributes)
    rows: list[dict] = []
    sums = {
        "samples": 0.0,
        "tokens": 0.0,
        "ended": 0.0,
        "matched": 0.0,
        "attribute_logp": 0.0,
        "ess": 0.0,
        "groups": 0.0,
    }
    engine = build_engine(model, tokenizer, cfg.sampling, run.autocast)
    for start, completions in sample_batches(engine, steered, cfg.sampling, lambda s: base + mine[s]):
        batch = range(start, start + len(completions) // n)  # offsets in the share
        groups = [completions[g * n : (g + 1) * n] for g in range(len(batch))]  # (G) x (n)
        initial = _score(
            run,
            model,
            [[_example(steered[p], c.token_ids, share[p].source) for c in grp] for p, grp in zip(batch, groups)],
            tokenizer.pad_token_id,
            s2.score_batch_size,
        )
        prior_logps = _score(
            run,
            prior,
            [[_example(plain[p], c.token_ids, share[p].source) for c in grp] for p, grp in zip(batch, groups)],
            tokenizer.pad_token_id,
            s2.score_batch_size,
        )
        scored = attribute_model([prompts[p] for p in batch for _ in range(n)], [c.text for c in completions])
        attribute_logps, predicted, wanted = _attribute_logps(
            scored, names, [targets[p] for p in batch], n, s2.attribute_sigma
        )
        for g, p in enumerate(batch):
            log_w = attribute_logps[g].double() + torch.tensor(prior_logps[g]) - torch.tensor(initial[g])
            w = torch.softmax(log_w, 0)
            sums["ess"] += float(1.0 / (w**2).sum()) / n  # effective sample size of w', as a fraction of n
            rows.append(
                {
                    "prompt": prompts[p],
                    "label": fmt.label(targets[p]),
                    "prompt_ids": steered[p],
                    "prior_prompt_ids": plain[p],
                    "responses": [
                        {
                            "response": c.text,
                            "token_ids": c.token_ids,
                            "is_end": c.is_end,
                            "log(P(a|x,y))": float(attribute_logps[g, i]),
                            "log(P(y|x))": prior_logps[g][i],
                            "log(Q(y|a,x))": initial[g][i],
                            "sampler_logprob": sum(c.logprobs),
                        }
                        for i, c in enumerate(groups[g])
                    ],
                }
            )
        sums["samples"] += len(completions)
        sums["groups"] += len(batch)
        sums["tokens"] += sum(len(c.token_ids) for c in completions)
        sums["ended"] += sum(c.is_end for c in completions)
        sums["matched"] += float((predicted.round().clamp(0, 4) == wanted).float().mean(-1).sum())  # per attribute
        sums["attribute_logp"] += float(attribute_logps.sum())
    return rows, sums


def _groups(rows: list[dict], where: str) -> list[Group]:
    return [
        Group(
            [_example(row["prompt_ids"], r["token_ids"], f"{where}:{i + 1}") for r in row["responses"]],
            [r["log(Q(y|a,x))"] for r in row["responses"]],
            [r["log(P(a|x,y))"] for r in row["responses"]],
            [r["log(P(y|x))"] for r in row["responses"]],
        )
        for i, row in enumerate(rows)
    ]


# --- 3: the importance-weighted update ----------------------------------------------------------


def loss_fn(model, batch):
    policy = group_logps(model, batch)  # (G, n), with grad
    return steerlm2_loss(
        policy, batch["initial_logps"], batch["attribute_logps"], batch["prior_logps"], batch["seq_num_targets"]
    )


def main(cfg: Config) -> None:
    run = start_run(cfg)
    s2 = cfg.steerlm2
    records = read_prompt_records(cfg.data.train.path, cfg.data.train.split, cfg.data.train.limit)
    attribute_model = build_reward_source(cfg.attribute_model)
    rollout_log = iteration_logger(run, s2.iterations, "samples.jsonl")
    prior_cfg = ModelConfig(path=s2.prior_path, precision=cfg.model.precision)
    if cfg.model.path is None:
        raise ConfigError("model.path: SteerLM 2.0 starts from a SteerLM model (what `alignkit run steerlm` saves)")

    for t in range(1, s2.iterations + 1):
        it_run = iteration_run(run, t)  # 4. iteration t > 1 samples from iteration t-1's trained model
        if it_run is None:
            continue
        out = it_run.output_dir
        tokenizer = load_tokenizer(it_run.cfg.model)
        model = load_causal_lm(it_run.cfg.model, tokenizer, seed=cfg.train.seed).to(run.dist.device)
        fmt = SteerLMFormat.from_config(model.config)
        if fmt is None:
            raise ConfigError(
                f"model.path={it_run.cfg.model.path} is not a SteerLM model (no `steerlm` in its config.json)"
            )
        for record in records:  # every record's targets, before any sampling
            _targets(fmt, record)
        unknown = [a for a in s2.likelihood_attributes or [] if a not in fmt.attributes]
        if unknown:
            raise ConfigError(
                f"steerlm2.likelihood_attributes: {unknown} are not in the model's label ({', '.join(fmt.attributes)})"
            )

        # --- 1-2. Q' samples n per (prompt, targets); log P(a|x,y), log P(y|x), log Q' -----------
        samples = out / "samples.jsonl"
        if samples.is_file():
            rows = [json.loads(line) for line in samples.read_text().splitlines()]
            run.log.info(f"iteration {t}: reusing {len(rows)} sampled groups from {samples}")
        else:
            prior = load_causal_lm(prior_cfg, tokenizer, seed=cfg.train.seed).to(run.dist.device)
            rows, sums = gather_rollouts(
                *sample_groups(run, cfg, model, prior, tokenizer, fmt, records, attribute_model, t), run.dist
            )
            del prior
            n = max(sums["samples"], 1)
            metrics = {
                "rollout/attribute_match": sums["matched"] / n,  # per likelihood attribute
                "rollout/log_p_attributes": sums["attribute_logp"] / n,
                "rollout/response_tokens": sums["tokens"] / n,
                "rollout/ended_fraction": sums["ended"] / n,
                "rollout/weights_ess": sums["ess"] / max(sums["groups"], 1),
            }
            rollout_log.log(t, metrics)
            run.log.info(f"iteration {t}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if run.dist.is_main:
                write_jsonl(rows, samples)
            barrier(run.dist)

        # --- 3. minimise sum_i (w'_i - b'_i) NLL(y_i), b' from the current policy each step --------
        groups = _groups(rows, str(samples))
        model = fit(
            it_run,
            model,
            groups,
            lambda g: sum(len(e.input_ids) for e in g.conditioned),
            partial(collate, pad_id=tokenizer.pad_token_id),
            loss_fn,
            tensor_parallel=True,  # sampling above used whole models; training may split the policy
        )
        save_final(it_run, model, tokenizer, config_updates={"steerlm": fmt.to_config()})
        barrier(run.dist)
        del model

    rollout_log.close()
    copy_last_iteration(run, s2.iterations)
