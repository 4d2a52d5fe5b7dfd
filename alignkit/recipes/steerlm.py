"""SteerLM: attribute-conditioned SFT, steerable at inference (Dong et al. 2023, "SteerLM:
Attribute Conditioned SFT as an (User-Steerable) Alternative to RLHF"; NeMo-Aligner's SteerLM).

    1. an attribute model (a regression reward model, `alignkit run reward_model --config
       attribute_model`) predicts each response's attributes (helpfulness, correctness, verbosity...)
    2. annotate: every training response gets the label `name:level,...` (scores clipped to 0..4,
       rounded) -- from the attribute model, any reward source with attributes, or labels already
       in the data
    3. attribute-conditioned SFT: the label is written into the assistant turn's header and the
       model learns p(response | prompt, label); the loss covers the response only
    4. at inference, ask for the attributes you want (`alignkit generate --attributes verbosity:0`,
       or `attributes` in a request to `alignkit serve generate`)

Data (`data.train`): prompt/response or chat records with a `label` string or an `attributes`
object; records without either need `annotate` (a reward source that returns attributes, e.g.
`annotate.kind=model annotate.path=runs/rm/final` or `annotate.kind=oracle`), and then every
record is annotated and written to `output_dir/annotated.jsonl` (reused when resuming).

The saved model's config.json records the label format (`steerlm`: attribute names, template,
the default level of each attribute: the most common one in the training labels).

    alignkit run steerlm --config tiny
    alignkit run steerlm --config my.yaml model.path=runs/sft/final data.train.path=responses.jsonl \\
        annotate.kind=model annotate.path=runs/rm/attributes/final
    alignkit annotate --data responses.jsonl --out labelled.jsonl --reward-model runs/rm/attributes/final
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from alignkit.config import DataConfig, RecipeConfig, Section
from alignkit.data.batching import collate_rows
from alignkit.data.formats import to_messages
from alignkit.data.io import DataError, Record, read_records, write_jsonl
from alignkit.data.sft import make_rows, row_length
from alignkit.data.steerlm import (
    DEFAULT_ATTRIBUTES,
    DEFAULT_LABEL_TEMPLATE,
    SteerLMFormat,
    annotate,
    encode_steerlm,
    record_targets,
)
from alignkit.data.tokenize import EncodeStats, fit_length
from alignkit.models.forward import sft_token_loss
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.rewards import RewardSourceConfig, build_reward_source
from alignkit.training.distributed import barrier
from alignkit.training.loop import fit, save_final, start_run

__all__ = ["Config", "SteerLMConfig", "main"]


class SteerLMConfig(Section):
    attributes: list[str] = list(DEFAULT_ATTRIBUTES)  # the label's attributes, in order
    label_template: str = DEFAULT_LABEL_TEMPLATE  # appended after the generation prompt; {label} is replaced


class Config(RecipeConfig):
    data: DataConfig
    steerlm: SteerLMConfig = SteerLMConfig()
    annotate: RewardSourceConfig | None = None  # label every training record with this attribute source


# --- 1-2: annotate responses with an attribute model ------------------------------------------


def _annotated_records(run, cfg: Config, dataset, name: str) -> list[Record]:
    """The dataset's records; with `annotate`, labelled by it and written to output_dir/NAME.jsonl
    (reused when resuming)."""
    records = read_records(dataset.path, dataset.split, dataset.limit)
    if cfg.annotate is None:
        return records
    path = run.output_dir / f"{name}.jsonl"
    if not path.is_file():
        if run.dist.is_main:
            run.log.info(
                f"annotating {len(records)} responses of {dataset.path} with the {cfg.annotate.kind} attribute source"
            )
            write_jsonl(annotate(records, build_reward_source(cfg.annotate), cfg.steerlm.attributes), path)
        barrier(run.dist)
    return read_records(str(path))


# --- 3: attribute-conditioned SFT ---------------------------------------------------------------


def load_steerlm_examples(records: list[Record], fmt: SteerLMFormat, data: DataConfig, tokenizer):
    """(examples, stats, labels): each record's conversation with its label line in the assistant header."""
    stats, examples, labels = EncodeStats(total=len(records)), [], []
    for record in records:
        targets = record_targets(record.data, fmt.attributes, record.source)
        example = encode_steerlm(
            tokenizer,
            to_messages(record, data.system_prompt),
            fmt.label_line(targets),
            data.chat_template,
            record.source,
        )
        example = fit_length(example, data.max_seq_len, data.overlength, stats)
        if example is not None:
            examples.append(example)
            labels.append(targets)
    stats.kept = len(examples)
    return examples, stats, labels


def main(cfg: Config) -> None:
    run = start_run(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed)
    fmt = SteerLMFormat(tuple(cfg.steerlm.attributes), cfg.steerlm.label_template)

    records = _annotated_records(run, cfg, cfg.data.train, "annotated")
    train, stats, labels = load_steerlm_examples(records, fmt, cfg.data, tokenizer)
    run.log.info(f"train data {cfg.data.train.path}: {stats.summary()}")
    if not train:
        raise DataError(f"{cfg.data.train.path}: no training example left ({stats.summary()})")
    val_rows = None
    if cfg.data.validation is not None:
        val_records = _annotated_records(run, cfg, cfg.data.validation, "annotated_validation")
        val, val_stats, _ = load_steerlm_examples(val_records, fmt, cfg.data, tokenizer)
        run.log.info(f"validation data {cfg.data.validation.path}: {val_stats.summary()}")
        val_rows = make_rows(val, cfg.data)

    # --- train: minimise -log p(response | prompt, label) ----------------------------------------
    collate = partial(collate_rows, pad_id=tokenizer.pad_token_id)
    model = fit(
        run, model, make_rows(train, cfg.data), row_length, collate, sft_token_loss, val_rows, tensor_parallel=True
    )

    # --- save, with the label format, for steering at inference -----------------------------------
    fmt = SteerLMFormat(fmt.attributes, fmt.label_template, SteerLMFormat.most_common_levels(labels, fmt.attributes))
    if cfg.checkpoint.save_final:
        save_final(run, model, tokenizer, config_updates={"steerlm": fmt.to_config()})
        run.log.info(
            f"steer it with: alignkit generate --model {Path(run.output_dir) / 'final'} --attributes {fmt.label()}"
        )
