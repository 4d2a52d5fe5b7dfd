"""Direct preference optimisation (DPO) and its family: IPO, cDPO, hinge, robust DPO, RPO,
SimPO and ORPO.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model") fits a policy to preference pairs (x, y_chosen, y_rejected) without a reward
model or sampling: the implicit reward beta * log(pi_theta(y|x) / pi_ref(y|x)) of the chosen
response is pushed above the rejected one's (eq. 7). The frozen reference pi_ref is the
starting policy. Variants differ only in the per-pair loss of the reward gap
(`alignkit.losses.preference`), picked by `loss.type`:

    dpo (label_smoothing > 0: cDPO)  ipo  hinge  robust  rpo_sq  rpo_bwd_kl  rpo_fwd_kl
    simpo  orpo   (reference-free: no reference log-probs at all)
    kto           (unpaired data: {"prompt", "completion", "label"}; Ethayarajh et al. 2024)

KTO reuses the pair machinery: each example becomes [own completion | a mismatched completion]
(`alignkit.data.preference.load_kto_pairs`); the mismatched log-ratios give the reference point
z_0 = max(0, mean(log pi/pi_ref)), estimated over each micro-batch (as TRL does per device).

Per pair:  loss = preference_weight * L_pref + sft_weight * NLL(chosen), where NLL(chosen) is
the chosen response's negative log-likelihood averaged over its tokens (RPO in TRL's sense).
The unit of normalisation is one pair: the loop divides by the number of pairs in the step.

Reference log-probabilities (`reference.mode`):
  cached  computed once before training by the starting policy and cached on disk, keyed by
          the reference model and the tokenized data; reused by later runs and on resume.
  online  a frozen reference scores every micro-batch next to the policy.
With LoRA the reference is the base model with its adapters disabled: no second copy.
Before training the recipe checks that policy and reference agree on the first batch (they
are the same model at step 0) and warns loudly if they do not.

Chosen and rejected responses go through the model in ONE padding-free forward pass: each
pair is one row [prompt+chosen | prompt+rejected] with restarting position ids.

Iterative on-policy DPO (`online`; Xu et al. 2023, "Some things are more CRINGE than others:
iterative preference optimization with the pairwise cringe loss"; Xiong et al. 2024, "Iterative
preference learning from human feedback: bridging theory and practice for RLHF under
KL-constraint"; Guo et al. 2024, "Direct language model alignment from online AI feedback").
`data.train` then holds prompts, and per iteration t = 1..T:

    1. the current policy (iteration t-1's result; at t = 1 `model.*`) answers every prompt n times
    2. the judge (`online.judge`: a reward model, a server, a Python function or the oracle)
       scores the answers; an answer cut by max_new_tokens scores 0
    3. the best and the worst answer to a prompt become a pair (prompts whose answers tie within
       `online.min_margin` give none)
    4. DPO on the pairs, from and against the current policy (it is the reference)

Each iteration is a complete run in `output_dir/iteration_t/` (pairs.jsonl, then the DPO run's
metrics, checkpoints and final/), so a killed run resumes at the iteration (and training step)
it stopped in; `output_dir/final/` is the last iteration's model. The pairs' statistics per
iteration go to `output_dir/metrics.jsonl` (`rollout/reward`, `rollout/ended_fraction`,
`rollout/response_tokens`, `rollout/pairs`, `rollout/margin`). The samples do not depend on the
number of processes (`alignkit.training.sampled_pairs`).

    alignkit run dpo --config tiny
    alignkit run dpo --config my.yaml model.path=runs/sft/final loss.type=ipo loss.beta=0.5 --nproc 8
    alignkit run dpo --config tiny_online
"""

from __future__ import annotations

import contextlib
import json
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file

from alignkit.config import ConfigError, DataConfig, DatasetConfig, RecipeConfig, SamplingConfig, Section
from alignkit.data.cache import cache_key, model_fingerprint, save_safetensors
from alignkit.data.formats import read_prompt_records
from alignkit.data.io import write_jsonl
from alignkit.data.preference import (
    PreferencePair,
    collate_pairs,
    load_kto_pairs,
    load_preference_pairs,
    pair_length,
)
from alignkit.data.tokenize import IGNORE
from alignkit.losses.preference import dpo_loss, kto_loss, kto_reference_point, orpo_loss, simpo_loss
from alignkit.models.forward import logits_at, sequence_logps
from alignkit.models.loading import adapters_off, load_causal_lm, load_tokenizer
from alignkit.rewards import RewardSourceConfig, build_reward_source
from alignkit.tasks.datasets import MIN_PREFERENCE_MARGIN
from alignkit.tasks.oracle import oracle_rewards
from alignkit.training.distributed import barrier, score_sharded, wrap_frozen
from alignkit.training.logging import MetricLogger
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
from alignkit.training.sampled_pairs import Judge, sampled_preference_pairs

__all__ = ["Config", "OnlineConfig", "PreferenceLossConfig", "ReferenceConfig", "main", "policy_logps"]

LossType = Literal["dpo", "ipo", "hinge", "robust", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "simpo", "orpo", "kto"]
REFERENCE_FREE = ("simpo", "orpo")
NEEDS_REWARDS = ("rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl")


class PreferenceLossConfig(Section):
    type: LossType = "dpo"
    beta: float = Field(0.1, gt=0.0)  # KL strength (IPO's tau; SimPO's reward scale, ORPO's lambda)
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5)  # dpo: cDPO's label-flip rate; robust: rDPO's; simpo: smoothing
    gt_reward_scale: float = Field(1.0, ge=0.0)  # eta, scales the ground-truth reward gap (rpo_* only)
    simpo_gamma: float = Field(1.0, ge=0.0)  # SimPO's target reward margin gamma (simpo only)
    desirable_weight: float = Field(1.0, ge=0.0)  # KTO's lambda_D (kto only)
    undesirable_weight: float = Field(1.0, ge=0.0)  # KTO's lambda_U (kto only)
    preference_weight: float = Field(1.0, ge=0.0)
    # Weight of NLL(chosen response), averaged over its tokens, per pair (kto: per desirable
    # example). None: 1 for orpo (its L_SFT term, ORPO eq. 6), 0 otherwise.
    sft_weight: float | None = Field(None, ge=0.0)
    # Per-token mean instead of sum of the response log-probs. None: on for simpo and orpo
    # (which are defined on means), off otherwise.
    average_logprobs: bool | None = None

    @model_validator(mode="after")
    def _resolve(self) -> PreferenceLossConfig:
        if self.type in REFERENCE_FREE and self.average_logprobs is False:
            raise ValueError(f"loss.average_logprobs: {self.type} is defined on per-token mean log-probs")
        if self.preference_weight == 0 and not self.sft_weight:
            raise ValueError("loss.preference_weight and loss.sft_weight are both 0: nothing to train")
        if self.type == "robust" and self.label_smoothing >= 0.5:
            raise ValueError("loss.label_smoothing: robust DPO divides by 1 - 2 * label_smoothing; use < 0.5")
        return self

    @property
    def sft(self) -> float:
        return self.sft_weight if self.sft_weight is not None else float(self.type == "orpo")

    @property
    def average(self) -> bool:
        return self.average_logprobs if self.average_logprobs is not None else self.type in REFERENCE_FREE


class ReferenceConfig(Section):
    # The reference is the starting policy (model.*); with LoRA, the base model, adapters off.
    mode: Literal["cached", "online"] = "cached"
    cache_dir: str | None = None  # default <output_dir>/reference_logps
    # Max |policy - reference| summed log-prob per sequence allowed at step 0 before warning.
    # None: 1e-3 in fp32, 0.5 with bf16 (rounding accumulates over the response tokens).
    check_tolerance: float | None = Field(None, gt=0.0)


class OnlineConfig(Section):
    """Iterative on-policy DPO (module docstring); `data.train` holds the prompts."""

    iterations: int = Field(2, ge=1)
    # n answers per prompt (>= 2), in batches of batch_size prompts; seed None: train.seed.
    # Iteration t samples with seed + t.
    sampling: SamplingConfig = SamplingConfig(n=4, temperature=1.0)
    judge: RewardSourceConfig
    min_margin: float = Field(MIN_PREFERENCE_MARGIN, ge=0.0)  # best minus worst reward needed for a pair
    # Sample under the training precision's autocast (bf16_autocast: bf16 matmuls, faster);
    # false: in the weights' own dtype (fp32 master weights under bf16_autocast).
    autocast: bool = True

    @model_validator(mode="after")
    def _two_answers(self) -> OnlineConfig:
        if self.sampling.n < 2:
            raise ValueError("online.sampling.n: a pair needs at least 2 answers per prompt")
        return self


class Config(RecipeConfig):
    data: DataConfig  # data.train: preference pairs; with `online`, prompt records
    loss: PreferenceLossConfig = PreferenceLossConfig()
    reference: ReferenceConfig = ReferenceConfig()
    online: OnlineConfig | None = None

    @model_validator(mode="after")
    def _online_fits(self) -> Config:
        if self.online is not None and self.loss.type == "kto":
            raise ValueError("online: on-policy pairs are paired data; loss.type=kto learns from unpaired labels")
        if self.online is not None and self.model.lora.enabled and not self.model.lora.merge_on_save:
            raise ValueError("online with LoRA needs model.lora.merge_on_save (the next iteration loads final/)")
        return self


# --- log-probabilities: both responses of every pair in one forward pass ------------------


def policy_logps(model, batch) -> torch.Tensor:
    """(2P,) summed response log-probs, interleaved [chosen_0, rejected_0, chosen_1, ...]."""
    select = batch["target_ids"] != IGNORE  # (B, T)
    logits = logits_at(model, batch["input_ids"], batch["position_ids"], select)  # (N, V)
    return sequence_logps(logits, batch["target_ids"][select], batch["seq_index"], batch["seq_num_targets"].numel())


@torch.no_grad()
def _reference_logps(reference, batch, lora: bool) -> torch.Tensor:
    with adapters_off(reference, lora):
        return policy_logps(reference, batch)


def loss_fn(model, batch, cfg: Config, reference=None):
    lc = cfg.loss
    logps = policy_logps(model, batch)  # (2P,) sums
    counts = batch["seq_num_targets"].to(logps.dtype)  # (2P,)
    chosen_nll = -(logps[0::2] / counts[0::2])  # (P,) per-token NLL of each chosen response
    if lc.average:
        logps = logps / counts
    chosen, rejected = logps[0::2], logps[1::2]  # (P,)
    ref = None
    if lc.type not in REFERENCE_FREE:
        if reference is not None:  # online
            ref = _reference_logps(reference, batch, cfg.model.lora.enabled)
        else:  # cached sums
            ref = torch.stack([batch["reference_chosen_logps"], batch["reference_rejected_logps"]], 1).reshape(-1)
        ref = ref.to(logps.device) / counts if lc.average else ref.to(logps.device)
    if lc.type == "kto":
        # Pairs are [own completion | mismatched completion]; the mismatched log-ratios estimate
        # KL(policy || reference), the reference point z_0 (detached), over this micro-batch.
        labels = batch.get("kto_label", torch.zeros(0, dtype=torch.bool)).to(logps.device)  # (P,)
        z = kto_reference_point(rejected.detach(), ref[1::2]) if len(labels) else 0.0
        pref, metrics = kto_loss(
            chosen,
            ref[0::2],
            labels,
            z,
            beta=lc.beta,
            desirable_weight=lc.desirable_weight,
            undesirable_weight=lc.undesirable_weight,
        )
        chosen_nll = chosen_nll * labels  # SFT on desirable completions only
    elif lc.type == "simpo":
        pref, metrics = simpo_loss(
            chosen, rejected, beta=lc.beta, gamma=lc.simpo_gamma, label_smoothing=lc.label_smoothing
        )
    elif lc.type == "orpo":
        pref, metrics = orpo_loss(chosen, rejected, beta=lc.beta)
    else:
        pref, metrics = dpo_loss(
            chosen,
            rejected,
            ref[0::2],
            ref[1::2],
            beta=lc.beta,
            loss_type=lc.type,
            label_smoothing=lc.label_smoothing,
            chosen_rewards_gt=batch["chosen_reward_gt"],
            rejected_rewards_gt=batch["rejected_reward_gt"],
            gt_reward_scale=lc.gt_reward_scale,
        )
    sft = chosen_nll.sum()
    loss = lc.preference_weight * pref + lc.sft * sft
    metrics.update({"loss": loss.detach(), "preference_loss": pref.detach(), "sft_loss": sft.detach()})
    return loss, metrics


# --- cached reference log-probs ---------------------------------------------------------

_FORMAT = "dpo-reference-logps-1"


def _cache_path(cache_dir: Path, name: str, fingerprint: dict, pairs: list[PreferencePair]) -> Path:
    flat = [e for p in pairs for e in (p.chosen, p.rejected)]
    return cache_dir / f"{name}-{cache_key({'format': _FORMAT, 'reference': fingerprint}, flat)}.safetensors"


def _score_pairs(run, cfg: Config, model, pairs: list[PreferencePair], pad_id: int) -> torch.Tensor:
    """(E, 2) summed reference log-probs [chosen, rejected] of every pair, scored in shares over
    processes."""

    def score(index: list[int]) -> torch.Tensor:  # (len(index), 2) in the order of `index`
        out = torch.zeros(len(index), 2, dtype=torch.float64)
        for start in range(0, len(index), cfg.train.micro_batch_size):
            chunk = list(range(start, min(start + cfg.train.micro_batch_size, len(index))))
            batch = to_device(collate_pairs([pairs[index[i]] for i in chunk], pad_id), run.dist.device)
            with run.autocast():
                logps = _reference_logps(model, batch, cfg.model.lora.enabled)  # (2P,) in packed order
            out[[chunk[j] for j in batch["order"]]] = logps.double().cpu().reshape(-1, 2)
        return out

    model.eval()
    logps = score_sharded(len(pairs), 2, run.dist, score)
    model.train()
    return logps


def _cached_reference(run, cfg: Config, model, datasets: dict[str, list[PreferencePair]], pad_id: int) -> None:
    cache_dir = Path(cfg.reference.cache_dir or run.output_dir / "reference_logps")
    fingerprint = model_fingerprint(cfg.model, cfg.train.seed)
    paths = {name: _cache_path(cache_dir, name, fingerprint, pairs) for name, pairs in datasets.items()}
    # Every process looks before any scoring (a collective), so all see the same answer.
    missing = {name for name, path in paths.items() if not path.is_file()}
    for name, pairs in datasets.items():
        path = paths[name]
        if name not in missing:
            run.log.info(f"reusing cached reference log-probs for {name}: {path}")
            logps = load_file(str(path))["logps"]
            if logps.shape != (len(pairs), 2):
                raise ValueError(
                    f"{path}: holds {tuple(logps.shape)} log-probs for {len(pairs)} pairs; delete it to recompute"
                )
        else:
            run.log.info(f"computing reference log-probs for {len(pairs)} {name} pairs")
            logps = _score_pairs(run, cfg, model, pairs, pad_id)
            if run.dist.is_main:
                save_safetensors(path, {"logps": logps}, {"reference": json.dumps(fingerprint)})
        for pair, (c, r) in zip(pairs, logps.tolist()):
            pair.reference = (c, r)


@torch.no_grad()
def _check_step0(run, cfg: Config, model, reference, pairs: list[PreferencePair], pad_id: int) -> float:
    """Policy == reference at step 0: compare them on the first micro-batch, warn if not."""
    batch = to_device(collate_pairs(pairs[: cfg.train.micro_batch_size], pad_id), run.dist.device)
    model.eval()
    with run.autocast():
        policy = policy_logps(model, batch)
        if reference is not None:
            ref = _reference_logps(reference, batch, cfg.model.lora.enabled)
        else:
            ref = torch.stack([batch["reference_chosen_logps"], batch["reference_rejected_logps"]], 1).reshape(-1)
    model.train()
    diff = float((policy.double() - ref.double().to(policy.device)).abs().max())
    bf16 = cfg.model.precision != "fp32" or cfg.distributed.fsdp.param_dtype == "bf16"
    tolerance = cfg.reference.check_tolerance or (0.5 if bf16 else 1e-3)
    if diff > tolerance:
        run.log.warning(
            f"policy and reference log-probs differ at step 0 by up to {diff:.4g} per sequence (tolerance "
            f"{tolerance}): they should be the same model. A stale reference cache, a different precision "
            "or batch shape when the cache was made, or non-deterministic kernels; the DPO rewards are offset"
        )
    else:
        run.log.info(f"step-0 check: policy and reference log-probs agree (max difference {diff:.2g})")
    return diff


def _check_kto_balance(run, lc: PreferenceLossConfig, pairs: list[PreferencePair]) -> None:
    """KTO's paper recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3]; say so when it is not."""
    desirable = sum(p.label for p in pairs)
    undesirable = len(pairs) - desirable
    run.log.info(f"KTO data: {desirable} desirable, {undesirable} undesirable examples")
    if desirable == 0 or undesirable == 0:
        raise ConfigError("KTO needs both desirable and undesirable examples in the training data")
    ratio = lc.desirable_weight * desirable / (lc.undesirable_weight * undesirable)
    if not 1.0 <= ratio <= 4 / 3:
        run.log.warning(
            f"KTO: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {ratio:.3g}, outside "
            f"the recommended [1, 4/3] (Ethayarajh et al. 2024); e.g. loss.desirable_weight="
            f"{lc.undesirable_weight * undesirable / desirable * 1.15:.3g}"
        )


def summarize_kto(metrics: dict[str, float]) -> dict[str, float]:
    """KTO's per-class sums (divided by all examples) -> means over desirable / undesirable ones."""
    out = {k: v for k, v in metrics.items() if not k.startswith("count/")}
    for side in ("chosen", "rejected"):
        count = metrics.get(f"count/{side}", 0.0)
        for key in (f"rewards/{side}", f"logps/{side}"):
            if key in out and count > 0:
                out[key] = out[key] / count
            else:  # no example of this class in the batch: no mean to report
                out.pop(key, None)
    if metrics.get("count/chosen", 0.0) > 0 and metrics.get("count/rejected", 0.0) > 0:
        out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def main(cfg: Config) -> None:
    run = start_run(cfg)
    if cfg.loss.type in NEEDS_REWARDS and cfg.loss.label_smoothing:
        raise ConfigError(f"loss.label_smoothing is not used by loss.type={cfg.loss.type}")
    if cfg.online is not None:
        _iterate(run)
        return
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed)
    model = _train(run, model, tokenizer, cfg.data.train)
    if cfg.checkpoint.save_final:
        save_final(run, model, tokenizer)


def _train(run: Run, model, tokenizer, train_data: DatasetConfig):
    """DPO of `model` (the policy, and the reference as it is now) on the pairs of `train_data`;
    returns the trained model (wrapped by `fit`)."""
    cfg, lc = run.cfg, run.cfg.loss
    pad_id = tokenizer.pad_token_id

    # --- preference pairs ----------------------------------------------------------------------
    datasets: dict[str, list[PreferencePair]] = {}
    for name, spec in (("train", train_data), ("validation", cfg.data.validation)):
        if spec is not None:
            if lc.type == "kto":
                datasets[name], stats = load_kto_pairs(spec, cfg.data, tokenizer)
            else:
                datasets[name], stats = load_preference_pairs(
                    spec, cfg.data, tokenizer, require_rewards=lc.type in NEEDS_REWARDS
                )
            run.log.info(f"{name} data {spec.path}: {stats.summary().replace('examples', 'pairs')}")
    if not datasets["train"]:
        raise ConfigError(f"no training pair left after data.overlength={cfg.data.overlength}")
    if lc.type == "kto":
        _check_kto_balance(run, lc, datasets["train"])

    # --- reference log-probs: the starting policy, cached on disk or scored online ----------
    reference = None
    if lc.type not in REFERENCE_FREE:
        model.to(run.dist.device)
        if cfg.reference.mode == "cached":
            _cached_reference(run, cfg, model, datasets, pad_id)
        elif cfg.model.lora.enabled:
            reference = model  # the same module: adapters are switched off around its forward
        else:
            reference = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed)
            reference = wrap_frozen(reference, run.dist, cfg.distributed, tensor_parallel=cfg.online is None)
        _check_step0(run, cfg, model, reference, datasets["train"], pad_id)

    # --- train: minimise preference_weight * L_pref + sft_weight * NLL(chosen) per pair -----
    collate = partial(collate_pairs, pad_id=pad_id)

    def train_loss(policy, batch):
        # With LoRA online the reference is the policy itself, as wrapped by `fit`.
        ref = policy if reference is model else reference
        return loss_fn(policy, batch, cfg, ref)

    return fit(
        run,
        model,
        datasets["train"],
        pair_length,
        collate,
        train_loss,
        datasets.get("validation"),
        summarize_kto if lc.type == "kto" else None,
        # offline, every split of work goes by data-parallel rank (fit, score_sharded); the online
        # iterations sample on each process (refused with tp > 1 in _iterate)
        tensor_parallel=cfg.online is None,
    )


# --- iterative on-policy DPO: sample, judge, pair, train; repeat from the result ----------


def _judge(cfg: RewardSourceConfig, device) -> Judge:
    """The reward source as a judge of Python floats. The oracle is called directly: its rewards
    have 4 decimals, and a float32 RewardOutput would turn a gap of exactly min_margin into less."""
    if cfg.kind == "oracle":
        return oracle_rewards
    source = build_reward_source(cfg, device)
    return lambda prompts, responses: source(prompts, responses).rewards.tolist()


def _iterate(run: Run) -> None:
    cfg, online = run.cfg, run.cfg.online
    if run.dist.tp > 1:
        raise ConfigError(
            f"distributed.mesh.tp={run.dist.tp}: online DPO samples on each process's own prompts, so it runs "
            "data parallel only (offline DPO takes tensor parallel); set distributed.mesh.tp=1"
        )
    prompts = read_prompt_records(cfg.data.train.path, cfg.data.train.split, cfg.data.train.limit)
    pair_log = iteration_logger(run, online.iterations, "pairs.jsonl")
    for t in range(1, online.iterations + 1):
        it_run = iteration_run(run, t)  # 1. the policy: iteration t-1's final model (t = 1: model.*)
        if it_run is None:
            continue
        tokenizer = load_tokenizer(it_run.cfg.model)
        model = load_causal_lm(it_run.cfg.model, tokenizer, seed=cfg.train.seed).to(run.dist.device)
        if _pairs_path(run, t).is_file():
            run.log.info(f"iteration {t}: reusing the pairs in {_pairs_path(run, t)}")
        else:  # 2-3. answers, judged, best vs worst
            _sample_pairs(it_run, t, model, tokenizer, prompts, pair_log)
        # 4. DPO from and against the current policy
        model = _train(it_run, model, tokenizer, DatasetConfig(path=str(_pairs_path(run, t))))
        save_final(it_run, model, tokenizer)
        barrier(run.dist)
        del model
    pair_log.close()
    copy_last_iteration(run, online.iterations)


def _pairs_path(run: Run, t: int) -> Path:
    return run.output_dir / f"iteration_{t}" / "pairs.jsonl"


def _sample_pairs(run: Run, t: int, model, tokenizer, prompts, pair_log: MetricLogger) -> None:
    """Iteration t's pairs from `model`'s answers, written to pairs.jsonl; statistics logged at step t.
    The judge (a reward model: its memory) lives only while the pairs are made."""
    online, data = run.cfg.online, run.cfg.data
    judge = _judge(online.judge, run.dist.device)
    sampling = online.sampling.model_copy(
        update={"seed": (online.sampling.seed if online.sampling.seed is not None else run.cfg.train.seed) + t}
    )
    with run.autocast() if online.autocast else contextlib.nullcontext():
        pairs, metrics = sampled_preference_pairs(
            model,
            tokenizer,
            prompts,
            sampling,
            judge,
            min_margin=online.min_margin,
            chat_template=data.chat_template,
            system_prompt=data.system_prompt,
            d=run.dist,
        )
    pair_log.log(t, metrics)
    run.log.info(
        f"iteration {t}: {len(pairs)} on-policy pairs from {len(prompts)} prompts x {sampling.n} answers; "
        + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    )
    if not pairs:
        raise ConfigError(
            f"iteration {t}: no pair: every prompt's answers scored within online.min_margin="
            f"{online.min_margin} of each other (or none ended: raise sampling.max_new_tokens)"
        )
    if run.dist.is_main:
        write_jsonl(pairs, run.output_dir / "pairs.jsonl")
    barrier(run.dist)
