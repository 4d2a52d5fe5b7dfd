"""Supervised fine-tuning (SFT): next-token cross-entropy on the assistant's tokens.

The first stage of every alignment pipeline (InstructGPT, Ouyang et al. 2022, step 1):
fine-tune a base model on demonstrations. Data is prompt/response or chat (see
`alignkit.data.formats`); the loss covers assistant turns only and is normalised by the
number of target tokens in the global batch.

    alignkit run sft --config tiny
    alignkit run sft --config my.yaml model.path=/models/base optim.lr=2e-5 --nproc 8
"""

from __future__ import annotations

from functools import partial

from alignkit.config import DataConfig, RecipeConfig
from alignkit.data.batching import collate_rows
from alignkit.data.sft import load_sft_examples, make_rows, row_length
from alignkit.models.forward import sft_token_loss
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.training.loop import fit, save_final, start_run

__all__ = ["Config", "main"]


class Config(RecipeConfig):
    data: DataConfig


def main(cfg: Config) -> None:
    run = start_run(cfg)

    # --- model and data ------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed)
    train, stats = load_sft_examples(cfg.data.train, cfg.data, tokenizer)
    run.log.info(f"train data {cfg.data.train.path}: {stats.summary()}")
    val_rows = None
    if cfg.data.validation is not None:
        val, val_stats = load_sft_examples(cfg.data.validation, cfg.data, tokenizer)
        run.log.info(f"validation data {cfg.data.validation.path}: {val_stats.summary()}")
        val_rows = make_rows(val, cfg.data)

    # --- train: minimise -log p(response | prompt) ----------------------------------------
    collate = partial(collate_rows, pad_id=tokenizer.pad_token_id)
    model = fit(
        run, model, make_rows(train, cfg.data), row_length, collate, sft_token_loss, val_rows, tensor_parallel=True
    )

    # --- save in Hugging Face format -------------------------------------------------------
    if cfg.checkpoint.save_final:
        save_final(run, model, tokenizer)
