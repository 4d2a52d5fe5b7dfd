"""SFT with knowledge distillation (KD) from a teacher's top-K logits.

Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network")
trains a student to match a teacher's next-token distribution instead of (or besides) the
one-hot ground truth. As in NeMo-Aligner's knowledge-distillation recipe, only the teacher's
K largest logits are kept: at each target position both distributions are renormalised over
the teacher's top-K ids and the loss is a forward or reverse KL between them
(`alignkit.losses.distill`), optionally mixed with the usual cross-entropy:

    per target token:  kd_weight * KL_K(teacher || student) + sft_weight * CE(student, target)

Two ways to get the teacher's top-K:
  offline  the teacher runs once over the training and validation examples before training
           (each process takes a share); the top-K logits and ids are cached on disk, keyed by
           the teacher, the tokenized data and K, and reused by later runs (and on resume).
  online   the frozen teacher runs next to the student on every micro-batch.

Teacher and student must share the tokenizer's vocabulary: the teacher's ids index the
student's logits, and the data is tokenized once, with the student's tokenizer.

    alignkit run distill --config tiny
    alignkit run distill --config my.yaml teacher.path=/models/big model.path=/models/small --nproc 8
    alignkit run distill --config my.yaml mode=online
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from alignkit.config import ConfigError, DataConfig, ModelConfig, RecipeConfig, Section
from alignkit.data.batching import collate_rows
from alignkit.data.cache import cache_key, model_fingerprint
from alignkit.data.distill import (
    TOPK_IDS,
    TOPK_LOGITS,
    attach_topk,
    collate_rows_with_teacher,
    load_topk,
    save_topk,
    topk_cache_spec,
)
from alignkit.data.sft import load_sft_examples, make_rows, row_length
from alignkit.data.tokenize import IGNORE
from alignkit.losses.distill import distill_loss
from alignkit.models.forward import logits_at
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.training.distributed import barrier
from alignkit.training.loop import fit, save_final, start_run

__all__ = ["Config", "DistillLossConfig", "main", "teacher_topk"]


class DistillLossConfig(Section):
    kl: Literal["forward", "reverse"] = "forward"  # forward: KL(teacher || student), mean-seeking
    kd_weight: float = Field(1.0, ge=0.0)
    sft_weight: float = Field(0.0, ge=0.0)  # cross-entropy on the ground-truth tokens (NeMo's tutorial uses 0.4)
    student_scale: float = Field(1.0, gt=0.0)  # inverse temperatures inside the top-K softmaxes
    teacher_scale: float = Field(1.0, gt=0.0)


class Config(RecipeConfig):
    data: DataConfig
    # A local HF model directory (`path`), or `random_init` for smoke tests only: a random
    # teacher has nothing to teach. Its `precision` is the precision of its forward passes.
    teacher: ModelConfig
    mode: Literal["offline", "online"] = "offline"
    top_k: int = Field(100, ge=1)  # NeMo-Aligner's offline default; costs 8*K bytes per target token on disk
    cache_dir: str | None = None  # offline top-K files; default <output_dir>/teacher_topk
    loss: DistillLossConfig = DistillLossConfig()

    @model_validator(mode="after")
    def _frozen_teacher(self) -> Config:
        if self.teacher.lora.enabled:
            raise ValueError("teacher.lora: the teacher is frozen, a LoRA adapter on it would never train")
        return self


@torch.no_grad()
def teacher_topk(teacher, batch, select, top_k: int, vocab_size: int, precision: str):
    """The teacher's K largest logits (sorted descending) and their ids where `select` is true.

    Returns `(logits, ids)`, both (N, K), rows in the row-major order of `select` (B, T),
    the order in which `logits_at` returns the student's logits.
    """
    # The teacher's own precision, whatever the student's autocast around this call.
    with torch.autocast(select.device.type, dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
        logits = logits_at(teacher, batch["input_ids"], batch["position_ids"], select)  # (N, V_teacher)
    # Columns past the tokenizer are vocabulary padding, not tokens; never hand them to the student.
    return logits[:, :vocab_size].float().topk(top_k, dim=-1)  # (N, K) values and ids, descending


def _teacher_pass(run, cfg: Config, teacher, examples, pad_id: int, vocab_size: int) -> dict:
    """This process's share of `examples` -> {example index: ((n, K) logits, (n, K) ids)} on CPU."""
    index = {id(e): i for i, e in enumerate(examples)}
    # Packed like training data (no compute on padding); rows dealt round-robin to processes.
    rows = make_rows(examples, cfg.data)[run.dist.rank :: run.dist.world_size]
    step = cfg.train.micro_batch_size
    out = {}
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        batch = {k: v.to(run.dist.device) for k, v in collate_rows(chunk, pad_id).items() if torch.is_tensor(v)}
        select = batch["target_ids"] != IGNORE  # (B, T)
        logits, ids = teacher_topk(teacher, batch, select, cfg.top_k, vocab_size, cfg.teacher.precision)
        # Row-major order of `select`: row by row, each row's examples left to right.
        members = [e for row in chunk for e in row]
        counts = [e.num_targets for e in members]
        for e, lg, ii in zip(members, logits.cpu().split(counts), ids.cpu().split(counts)):
            out[index[id(e)]] = (lg.clone(), ii.clone())
    return out


def _check_vocab(student_tokenizer, teacher_tokenizer) -> None:
    s, t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s != t:
        differ = sorted(set(s.items()) ^ set(t.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(
            f"teacher and student tokenizers differ (teacher {len(teacher_tokenizer)} tokens, student "
            f"{len(student_tokenizer)}; e.g. {differ}): top-K distillation needs one shared vocabulary, "
            "since the teacher's token ids index the student's logits"
        )


def loss_fn(model, batch, cfg: Config, teacher=None, vocab_size: int = 0):
    select = batch["target_ids"] != IGNORE  # (B, T)
    logits = logits_at(model, batch["input_ids"], batch["position_ids"], select)  # (N, V)
    if teacher is not None:  # online
        t_logits, t_ids = teacher_topk(teacher, batch, select, cfg.top_k, vocab_size, cfg.teacher.precision)
    else:  # offline: rows stored in the same order as `logits` (see collate_rows_with_teacher)
        t_logits, t_ids = batch[TOPK_LOGITS], batch[TOPK_IDS]  # (N, K)
    loss, metrics = distill_loss(
        logits,
        batch["target_ids"][select],
        t_logits,
        t_ids,
        kd_weight=cfg.loss.kd_weight,
        sft_weight=cfg.loss.sft_weight,
        kl=cfg.loss.kl,
        student_scale=cfg.loss.student_scale,
        teacher_scale=cfg.loss.teacher_scale,
    )
    metrics["loss"] = loss.detach()
    # Sums per target token like every metric (the loop divides by the target count): the
    # fraction of positions where the student's argmax is the teacher's argmax.
    metrics["teacher_top1_agreement"] = (logits.detach().argmax(-1) == t_ids[:, 0]).sum().float()
    return loss, metrics


def main(cfg: Config) -> None:
    run = start_run(cfg)

    # --- student, tokenizer and data (tokenized once, with the student's tokenizer) --------
    tokenizer = load_tokenizer(cfg.model)
    _check_vocab(tokenizer, load_tokenizer(cfg.teacher))
    vocab_size = len(tokenizer)
    if cfg.top_k > vocab_size:
        raise ConfigError(f"top_k={cfg.top_k} is larger than the vocabulary ({vocab_size} tokens)")
    model = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed)
    datasets = {}
    for name, spec in (("train", cfg.data.train), ("validation", cfg.data.validation)):
        if spec is not None:
            datasets[name], stats = load_sft_examples(spec, cfg.data, tokenizer)
            run.log.info(f"{name} data {spec.path}: {stats.summary()}")

    def load_teacher():
        # A random teacher (smoke tests) must differ from a same-shaped random student.
        teacher = load_causal_lm(cfg.teacher, tokenizer, seed=cfg.train.seed + 1)
        return teacher.to(run.dist.device).eval().requires_grad_(False)

    # --- offline: the teacher's top-K logits at every target token, once, cached on disk ----
    teacher = None
    if cfg.mode == "offline":
        cache_dir = Path(cfg.cache_dir or run.output_dir / "teacher_topk")
        fingerprint = model_fingerprint(cfg.teacher, cfg.train.seed + 1)
        metadata = {"teacher": json.dumps(fingerprint), "top_k": str(cfg.top_k)}  # for whoever inspects a file
        spec = topk_cache_spec(fingerprint, cfg.top_k)
        paths = {
            name: cache_dir / f"{name}-{cache_key(spec, examples)}.safetensors" for name, examples in datasets.items()
        }
        # Every process looks before the first barrier below, so all see the same answer.
        missing = [name for name, path in paths.items() if not path.is_file()]
        teacher = load_teacher() if missing else None
        for name in missing:
            run.log.info(f"computing teacher top-{cfg.top_k} logits for {len(datasets[name])} {name} examples")
            mine = _teacher_pass(run, cfg, teacher, datasets[name], tokenizer.pad_token_id, vocab_size)
            if not run.dist.enabled:
                save_topk(paths[name], mine, metadata)
                continue
            # Each process writes its share; rank 0 merges them into the one cache file.
            part = paths[name].with_suffix(f".part{run.dist.rank}")
            save_topk(part, mine)
            barrier(run.dist)
            if run.dist.is_main:
                merged = {}
                for r in range(run.dist.world_size):
                    shard = paths[name].with_suffix(f".part{r}")
                    merged.update(load_topk(shard))
                    shard.unlink()
                save_topk(paths[name], merged, metadata)
            barrier(run.dist)
        for name, path in paths.items():
            if name not in missing:
                run.log.info(f"reusing cached teacher top-K for {name}: {path}")
            attach_topk(datasets[name], load_topk(path), cfg.top_k, str(path))
        teacher = None  # not needed any more: free its memory for training
        collate = partial(collate_rows_with_teacher, pad_id=tokenizer.pad_token_id, top_k=cfg.top_k)
    else:
        teacher = load_teacher()
        collate = partial(collate_rows, pad_id=tokenizer.pad_token_id)

    # --- train: minimise KL_K(teacher || student) (+ sft_weight * CE) per target token -----
    val_rows = make_rows(datasets["validation"], cfg.data) if "validation" in datasets else None
    model = fit(
        run,
        model,
        make_rows(datasets["train"], cfg.data),
        row_length,
        collate,
        partial(loss_fn, cfg=cfg, teacher=teacher, vocab_size=vocab_size),
        val_rows,
    )

    # --- save in Hugging Face format --------------------------------------------------------
    if cfg.checkpoint.save_final:
        save_final(run, model, tokenizer)
