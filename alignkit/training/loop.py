"""The optimisation loop every training recipe shares, as plain functions.

A recipe hands `fit` its model, its items (packed rows, preference pairs, ...), a `collate`
that turns items into a micro-batch, and a `loss_fn(model, batch) -> (loss_sum, metric_sums)`.
`fit` owns what must be identical everywhere: the deterministic batch plan, gradient
accumulation normalised by the global number of loss units (target tokens, or examples for
sequence-level losses, counted over all micro-batches and ranks before the first forward),
clipping, the schedule, evaluation, checkpoints, resume and logging.

Normalisation: each micro-batch backpropagates `loss_sum * world_size / global_units`.
DDP and FSDP average gradients over ranks (divide by world_size), so the update is exactly
the gradient of `sum of all unit losses / global_units`, whatever the micro-batch size,
accumulation count or number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM

from alignkit.config import ConfigError, ModelConfig, RecipeConfig, save_config
from alignkit.data.batching import PAD_SLOT, BatchPlan
from alignkit.models.loading import (
    autocast,
    check_positions,
    meta_skeleton,
    save_causal_lm,
    save_hf_streamed,
    saved_weight_names,
    unwrap,
)
from alignkit.training.checkpoint import (
    latest_checkpoint,
    load_checkpoints,
    poll_checkpoint,
    save_checkpoints,
    wait_for_checkpoint,
)
from alignkit.training.distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    fsdp_sharded,
    full_state_dict,
    full_tensor,
    init_distributed,
    wrap_model,
)
from alignkit.training.logging import MetricLogger, get_logger
from alignkit.training.optim import build_optimizer, build_scheduler

__all__ = [
    "Run",
    "evaluate",
    "finish_step",
    "fit",
    "optimizer_step",
    "reduce_metrics",
    "resume",
    "save_final",
    "start_run",
    "to_device",
]

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# Turns the reduced metric means into the logged metrics, for metrics that are ratios of two
# sums (a per-attribute error over that attribute's count, a standard deviation from moments).
Summarize = Callable[[dict[str, float]], dict[str, float]]


@dataclass
class Run:
    cfg: RecipeConfig
    dist: Dist
    output_dir: Path

    @property
    def log(self):
        return get_logger()

    def autocast(self):
        precision = self.cfg.model.precision
        sharded = fsdp_sharded(self.dist, self.cfg.distributed)
        if self.cfg.distributed.fsdp.param_dtype == "bf16" and not sharded and precision == "fp32":
            precision = "bf16_autocast"  # no FSDP to cast the weights: the same bf16 compute by autocast
        return autocast(precision, self.dist.device)


def start_run(cfg: RecipeConfig) -> Run:
    """Join the process group, seed every RNG, create output_dir and save the resolved config."""
    d = init_distributed(cfg.distributed.backend, cfg.distributed.mesh)
    if not d.is_main:  # one voice in the console: other ranks report only problems
        get_logger().setLevel("WARNING")
    seed = cfg.train.seed + d.dp_rank  # a tensor-parallel group draws the same numbers
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    output_dir = Path(cfg.output_dir)
    _check_lengths(cfg)
    _check_resumable(cfg, output_dir)  # before config.yaml is overwritten
    barrier(d)  # every rank has read the old config.yaml before rank 0 replaces it
    if d.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    barrier(d)  # no rank writes into output_dir before it exists
    return Run(cfg=cfg, dist=d, output_dir=output_dir)


def _check_lengths(cfg: RecipeConfig) -> None:
    """`data.max_seq_len` within the position limit of every causal LM the recipe loads, checked
    from config.json before any weights load (beyond it, an embedding IndexError mid-training)."""
    data = getattr(cfg, "data", None)
    length = getattr(data, "max_seq_len", None)
    if length is None:
        return
    for name in ("model", "teacher"):
        model_cfg = getattr(cfg, name, None)
        if isinstance(model_cfg, ModelConfig):
            check_positions(model_cfg, length, "data.max_seq_len")


# What may change between a run and its resumption: how long it runs, how it logs, evaluates and
# checkpoints, and memory levers that do not change the maths. Anything else (the model, the data,
# the learning rate, the loss) would continue a run under another config than the one that made it.
_SAFE_ON_RESUME = (
    "output_dir",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "checkpoint.",
    "logging.",
    "distributed.",
    "model.compile",
    "model.gradient_checkpointing",
    "data.validation",
    "ppo.steps",
    "reinforce.steps",
    "draftp.steps",
    "draftp.val_every",
    "rs.iterations",
    "steerlm2.iterations",
    "online.iterations",
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def _check_resumable(cfg: RecipeConfig, output_dir: Path) -> None:
    """A run that would resume from `output_dir`'s checkpoints must have the config that wrote them
    (but for `_SAFE_ON_RESUME`): else stop, naming the keys that differ and the two ways out."""
    saved = output_dir / "config.yaml"
    started = any(output_dir.glob("checkpoints/step_*")) or any(output_dir.glob("iteration_*"))
    if not cfg.checkpoint.resume or not saved.is_file() or not started:
        return
    old, new = _flatten(yaml.safe_load(saved.read_text()) or {}), _flatten(cfg.model_dump(mode="json"))
    changed = sorted(
        key
        for key in old.keys() | new.keys()
        if old.get(key) != new.get(key)
        and not key.startswith(_SAFE_ON_RESUME)
        and not (key not in old and _is_new_default(cfg, key))
    )
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ConfigError(
            f"{output_dir} holds a run with another config, which this one would resume: {shown}{more}. "
            "Use a new output_dir, or checkpoint.resume=false to start over in this one"
        )


def _is_new_default(cfg: RecipeConfig, key: str) -> bool:
    """Whether `key` (dotted) is a setting at its default: one the saved config lacks because an
    older alignkit wrote it, which changes nothing when it keeps its default."""
    *path, leaf = key.split(".")
    section: Any = cfg
    for name in path:
        section = getattr(section, name, None)
    field = getattr(type(section), "model_fields", {}).get(leaf)
    if field is None:
        return False
    default = field.get_default(call_default_factory=True)
    return getattr(section, leaf) == default


def _no_grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _grad_norm(model: nn.Module, max_norm: float | None) -> float:
    """The global gradient norm, clipped to `max_norm`. Under FSDP + TP the gradients live on two
    meshes (the tensor-parallel layers' 2-D one, the rest's data-parallel one), which one stack
    cannot mix: then each mesh's norm is reduced alone, and they are combined."""
    params = [p for p in model.parameters() if p.grad is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    if len(groups) <= 1:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    squares = []
    for grads in groups.values():
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        squares.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm) ** 2)
    total = math.sqrt(sum(squares))
    coef = max_norm / (total + 1e-6) if max_norm else 1.0  # clip_grad_norm_'s epsilon
    if coef < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total


def reduce_metrics(sums: dict[str, torch.Tensor], units: float, d: Dist) -> dict[str, float]:
    if not sums:
        return {}
    keys = sorted(sums)
    # / tp: a tensor-parallel group's ranks computed the same micro-batches; count them once
    packed = all_reduce_sum(torch.stack([sums[k].detach().float().cpu() for k in keys]), d) / d.tp
    return {k: float(v) / max(units, 1.0) for k, v in zip(keys, packed.tolist())}


def _micro_batches(plan_batches: list[list[int]], items: Sequence, collate) -> list[Batch]:
    return [collate([items[i] if i != PAD_SLOT else None for i in mb]) for mb in plan_batches]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors moved to `device`; other entries (counts, orders) as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate(
    run: Run,
    model: nn.Module,
    plan: BatchPlan,
    items: Sequence,
    collate,
    loss_fn: LossFn,
    max_batches: int | None = None,
    summarize: Summarize | None = None,
) -> dict[str, float]:
    """Metric means over the validation items (sums over all ranks / global loss units)."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    units = 0
    batches = plan.eval_micro_batches()
    if max_batches is not None:
        batches = batches[:max_batches]
    with torch.no_grad():
        for batch in _micro_batches(batches, items, collate):
            units += batch["num_units"]
            with run.autocast():
                loss_sum, metrics = loss_fn(model, to_device(batch, run.dist.device))
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0) + value.detach().float()
    total_units = float(all_reduce_sum(torch.tensor(float(units)), run.dist)) / run.dist.tp
    model.train()
    metrics = reduce_metrics(sums, total_units, run.dist)
    return {f"val/{k}": v for k, v in (summarize(metrics) if summarize else metrics).items()}


def optimizer_step(
    run: Run, model: nn.Module, optimizer, batches: list[Batch], loss_fn: LossFn
) -> tuple[dict[str, torch.Tensor], float, float, float]:
    """One optimizer step over this process's micro-batches (gradient accumulation; the gradient
    all-reduce only on the last one). The loss is normalised by the global unit count: every
    loss_fn returns sums, so the step equals one big batch whatever the micro-batching and the
    number of processes. Returns (local metric sums, global units, global tokens, grad norm).
    The optimizer state persists in `optimizer`, so online recipes (PPO) call this once per
    minibatch of their own loop."""
    d = run.dist
    local = torch.tensor(
        [sum(b["num_units"] for b in batches), sum(b["num_tokens"] for b in batches)], dtype=torch.float64
    )
    global_units, global_tokens = (all_reduce_sum(local, d) / d.tp).tolist()  # a TP group shares its batch
    scale = d.dp_size / max(global_units, 1.0)  # FSDP averages over the data-parallel ranks
    sums: dict[str, torch.Tensor] = {}
    for k, batch in enumerate(batches):
        with _no_grad_sync(model, sync=k == len(batches) - 1), run.autocast():
            loss_sum, metrics = loss_fn(model, to_device(batch, d.device))
        (loss_sum * scale).backward()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0) + value.detach().float()
    grad_norm = _grad_norm(model, run.cfg.optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, global_units, global_tokens, grad_norm


def fit(
    run: Run,
    model: nn.Module,
    train_items: Sequence,
    item_length: Callable[[Any], int],
    collate: Callable[[list], Batch],
    loss_fn: LossFn,
    eval_items: Sequence | None = None,
    summarize: Summarize | None = None,
    tensor_parallel: bool = False,
) -> nn.Module:
    """Train `model` on `train_items`; returns the (wrapped) trained model. `tensor_parallel`: the
    recipe splits no work over processes but through `fit`, so `distributed.mesh.tp` may be > 1
    (the items are split over data-parallel ranks; a tensor-parallel group shares its batch)."""
    cfg, d = run.cfg, run.dist
    tc = cfg.train
    model = wrap_model(model, d, cfg.distributed, cfg.model.compile, tensor_parallel)
    model.train()
    plan = BatchPlan(
        [item_length(x) for x in train_items], tc.global_batch_size, tc.micro_batch_size, d.dp_rank, d.dp_size, tc.seed
    )
    eval_plan = (
        BatchPlan(
            [item_length(x) for x in eval_items],
            tc.global_batch_size,
            tc.micro_batch_size,
            d.dp_rank,
            d.dp_size,
            tc.seed,
            shuffle=False,
        )
        if eval_items
        else None
    )
    total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * plan.steps_per_epoch
    optimizer = build_optimizer(model, cfg.optim)
    parts = {"model": (model, optimizer, build_scheduler(optimizer, total_steps, cfg.optim))}
    start_step, _, logger = resume(run, parts, total_steps)
    scheduler = parts["model"][2]
    run.log.info(
        f"training {total_steps} steps: {len(train_items)} items, {plan.steps_per_epoch} steps/epoch, "
        f"global batch {tc.global_batch_size} = {tc.micro_batch_size} micro x {plan.accumulation_steps} "
        f"accumulation x {d.dp_size} data-parallel ranks; {d.world_size} processes{_mesh_text(d)}"
    )

    def evaluate_now() -> dict[str, float]:
        return evaluate(run, model, eval_plan, eval_items, collate, loss_fn, tc.eval_batches, summarize)

    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        batches = _micro_batches(plan.micro_batches(step), train_items, collate)
        lr = scheduler.get_last_lr()[0]
        sums, global_units, global_tokens, grad_norm = optimizer_step(run, model, optimizer, batches, loss_fn)
        scheduler.step()
        metrics: dict[str, float] = {}
        if _log_due(step + 1, tc.log_every, total_steps):  # the reduction is a collective: all ranks or none
            metrics = reduce_metrics(sums, global_units, d)
            if summarize is not None:
                metrics = summarize(metrics)
            elapsed = time.perf_counter() - t0
            metrics.update(
                {
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "epoch": step / max(plan.steps_per_epoch, 1),
                    "throughput/tokens_per_s": global_tokens / elapsed,
                    "perf/step_time_s": elapsed,
                }
            )
        finish_step(
            run,
            logger,
            step,
            metrics,
            parts,
            {},
            total_steps,
            evaluate=evaluate_now if eval_plan is not None and tc.eval_every else None,
        )

    if eval_plan is not None:
        logger.log(
            total_steps, evaluate(run, model, eval_plan, eval_items, collate, loss_fn, tc.eval_batches, summarize)
        )
    if start_step < total_steps:  # synchronous: the run ends with it
        save_checkpoints(run.output_dir / "checkpoints", total_steps, parts, d, cfg.checkpoint.keep_last)
    logger.close()
    return model


def _mesh_text(d: Dist) -> str:
    if d.tp == 1 and d.dp_replicate == 1:
        return ""
    return f" (mesh: dp_replicate {d.dp_replicate} x dp_shard {d.dp_shard} x tp {d.tp})"


def save_final(
    run: Run, model: nn.Module, tokenizer, config_updates: dict | None = None, auto_class=None, name: str = "final"
) -> Path | None:
    """Write output_dir/`name` in HF format (a collective: every rank calls it; rank 0 writes), as
    `auto_class` (default a causal LM; a reward model or critic: `AutoModelForSequenceClassification`);
    `config_updates` are recorded in its config.json (e.g. a SteerLM model's label format). A chat
    template given in `data.chat_template` is saved with the tokenizer: the model then renders
    conversations as it was trained to wherever it goes next (scoring, serving, the next recipe),
    also when its base had no template at all (GPT-2, base checkpoints).

    Parameter by parameter: each is gathered from its shards (FSDP, TP) and written into its
    safetensors shard on rank 0 before the next, so no rank holds the whole model. A LoRA model
    (merged on saving) and models whose weights transformers converts on saving are gathered whole."""
    out = run.output_dir / name
    template = getattr(getattr(run.cfg, "data", None), "chat_template", None)
    if template is not None:
        tokenizer = copy.copy(tokenizer)  # the caller's tokenizer keeps its own template
        tokenizer.chat_template = template
    hf_model = unwrap(model)
    skeleton = None if hasattr(hf_model, "peft_config") else meta_skeleton(hf_model)
    names = saved_weight_names(skeleton) if skeleton is not None else None
    if names is not None:
        tensors = hf_model.state_dict(keep_vars=True)  # this rank's shards (DTensors) or whole tensors
        specs = {n: (tensors[n].shape, tensors[n].dtype) for n in names}  # a DTensor's shape is the whole's
        save_hf_streamed(
            skeleton,
            specs,
            lambda n: full_tensor(tensors[n]),
            tokenizer,
            out,
            write=run.dist.is_main,
            config_updates=config_updates,
        )
    else:
        state, _ = full_state_dict(model)
        if run.dist.is_main:
            save_causal_lm(
                model,
                state,
                tokenizer,
                out,
                merge_lora=run.cfg.model.lora.merge_on_save,
                auto_class=auto_class or AutoModelForCausalLM,
                config_updates=config_updates,
            )
    if run.dist.is_main:
        run.log.info(f"saved {out}")
    return out


# --- iterated recipes (rejection sampling, SteerLM 2.0): one complete run per iteration ---------


def resume(run: Run, parts: dict, steps: int, trainable_only: bool = False) -> tuple[int, dict, MetricLogger]:
    """For loops that own their steps (RL, DRaFT+): restore the newest complete checkpoint set of
    `parts` (name -> (model, optimizer, scheduler)) when `checkpoint.resume`; returns the step to
    start from, the state saved with it by `finish_step` (empty on a fresh run), and the logger.
    `trainable_only`: the checkpoints hold only trainable parameters (see `finish_step`)."""
    start, extra = 0, {}
    latest = latest_checkpoint(run.output_dir / "checkpoints") if run.cfg.checkpoint.resume else None
    if latest is not None:
        state = load_checkpoints(latest, parts, run.dist, trainable_only)
        start, extra = state["step"], state["extra"]
        run.log.info(f"resumed from {latest} (step {start} of {steps})")
    logger = MetricLogger(
        run.output_dir,
        run.cfg.logging,
        steps,
        run.dist.is_main,
        run_config=run.cfg.model_dump(mode="json"),
        resumed_step=start,
    )
    return start, extra, logger


def _log_due(done: int, every: int, steps: int) -> bool:
    return done % every == 0 or done == steps


def finish_step(
    run: Run,
    logger: MetricLogger,
    step: int,
    metrics: dict[str, float],
    parts: dict,
    extra: dict,
    steps: int,
    trainable_only: bool = False,
    evaluate: Callable[[], dict[str, float]] | None = None,
) -> None:
    """The end of every training step, in every loop (`fit`, RL, DRaFT+): log when due (checking for
    non-finite values), evaluate every `train.eval_every` steps (not at the last step: the caller
    evaluates the final model), checkpoint when due, and the resume tests' kill switch."""
    done = step + 1
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"step {done}: non-finite {', '.join(f'{k}={metrics[k]}' for k in bad)}")
    if metrics and _log_due(done, run.cfg.train.log_every, steps):
        logger.log(done, metrics)
    if evaluate is not None and done % run.cfg.train.eval_every == 0 and done != steps:
        logger.log(done, evaluate())
    cc = run.cfg.checkpoint
    poll_checkpoint(run.dist)
    if cc.every and done % cc.every == 0 and done != steps:
        save_checkpoints(
            run.output_dir / "checkpoints", done, parts, run.dist, cc.keep_last, extra, trainable_only, cc.async_save
        )
    if done == steps:  # no process ends with an asynchronous save in flight
        wait_for_checkpoint(run.dist)
    if os.environ.get("ALIGNKIT_TEST_KILL_AT_STEP") == str(done):  # fault injection for resume tests
        os.kill(os.getpid(), signal.SIGKILL)


def iteration_run(run: Run, t: int) -> Run | None:
    """The run of iteration t in output_dir/iteration_t. Iteration 1 trains from the recipe's own
    model config (a path or a random init); iteration t > 1 from iteration t-1's final model.
    None when the iteration finished earlier (its final/ exists), so a resumed recipe skips it."""
    cfg = run.cfg
    out = run.output_dir / f"iteration_{t}"
    if (out / "final" / "config.json").is_file():
        run.log.info(f"iteration {t}: done earlier, reusing {out / 'final'}")
        return None
    model = (
        cfg.model
        if t == 1
        else cfg.model.model_copy(
            update={
                "path": str(run.output_dir / f"iteration_{t - 1}" / "final"),
                "random_init": None,
                "tokenizer_path": None,
            }
        )
    )
    if run.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(run.dist)
    return Run(cfg=cfg.model_copy(update={"model": model, "output_dir": str(out)}), dist=run.dist, output_dir=out)


def iteration_logger(run: Run, iterations: int, done_file: str) -> MetricLogger:
    """output_dir/metrics.jsonl for an iterated recipe's per-iteration statistics (step = iteration;
    no tensorboard: each iteration's training run has its own). On a resumed run the lines of the
    iterations whose `iteration_t/done_file` (their samples or pairs) is on disk are kept."""
    done = [t for t in range(1, iterations + 1) if (run.output_dir / f"iteration_{t}" / done_file).is_file()]
    logging_cfg = run.cfg.logging.model_copy(update={"tensorboard": False})
    return MetricLogger(run.output_dir, logging_cfg, iterations, run.dist.is_main, resumed_step=max(done, default=0))


def copy_last_iteration(run: Run, iterations: int) -> None:
    """output_dir/final <- the last iteration's model (rank 0), when checkpoint.save_final."""
    if run.cfg.checkpoint.save_final and run.dist.is_main:
        final = run.output_dir / "final"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(run.output_dir / f"iteration_{iterations}" / "final", final)
        run.log.info(f"saved {final} (iteration {iterations})")
