"""Rejection sampling (best-of-N fine-tuning): sample N answers per prompt, keep the best k by a
reward source, fine-tune on them, repeat.

The "RS" stage of Llama 2's RLHF (Touvron et al. 2023, section 3.2.3) and NeMo-Aligner's
rejection-sampling recipe. Per iteration t = 1..T:

    1. the current policy samples N = `sampling.n` responses to each prompt (the shared sampling loop,
       `alignkit.generation.batches.sample_batches`)
    2. the reward source scores them (a reward model, a server, a Python function or the oracle)
    3. the k best properly-ended responses of each prompt are kept
    4. SFT on the kept (prompt, response) pairs (NLL on the response tokens); the result is the
       next iteration's policy

Each iteration is a complete run in `output_dir/iteration_t/` (samples.jsonl, then the SFT run's
metrics, checkpoints and final/), so a killed run resumes at the iteration (and training step) it
stopped in; `output_dir/final/` is the last iteration's model. Rollout metrics per iteration go to
`output_dir/metrics.jsonl`: `rollout/reward` (all samples), `rollout/reward_kept`,
`rollout/response_tokens`, `rollout/ended_fraction`, `rollout/kept`.

Under torchrun each process samples and scores a share of the prompts; the kept samples are
gathered so that every process trains on the same set.

    alignkit run rejection_sampling --config tiny
    alignkit run rejection_sampling --config my.yaml model.path=runs/sft/final reward.kind=model \\
        reward.path=runs/rm/final rs.iterations=3
"""

from __future__ import annotations

import json
from functools import partial

from pydantic import Field, model_validator

from alignkit.config import ConfigError, DataConfig, RecipeConfig, SamplingConfig, Section
from alignkit.data.batching import collate_rows
from alignkit.data.formats import prompt_messages, read_prompt_records
from alignkit.data.io import Record, write_jsonl
from alignkit.data.sft import make_rows, row_length
from alignkit.data.tokenize import EncodeStats, encode_conversation, fit_length
from alignkit.generation.batches import sample_batches
from alignkit.generation.engine import build_engine
from alignkit.models.forward import sft_token_loss
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.rewards import RewardSourceConfig, build_reward_source
from alignkit.training.distributed import barrier, gather_rollouts
from alignkit.training.loop import Run, copy_last_iteration, fit, iteration_logger, iteration_run, save_final, start_run
from alignkit.training.rollouts import render_prompts

__all__ = ["Config", "RejectionSamplingConfig", "main"]


class RejectionSamplingConfig(Section):
    iterations: int = Field(2, ge=1)
    keep_per_prompt: int = Field(1, ge=1)  # k: the best k of the N = `sampling.n` (ties: the earlier sample)
    min_reward: float | None = None  # also drop kept samples below this reward
    keep_unended: bool = False  # keep samples cut by max_new_tokens (default: only EOS/stop-ended ones)


class Config(RecipeConfig):
    data: DataConfig  # data.train: the prompts, records with "prompt" (text or messages)
    reward: RewardSourceConfig
    rs: RejectionSamplingConfig = RejectionSamplingConfig()
    sampling: SamplingConfig = SamplingConfig(n=4)  # N samples per prompt

    @model_validator(mode="after")
    def _keep_at_most_n(self) -> Config:
        if self.rs.keep_per_prompt > self.sampling.n:
            raise ValueError(f"rs.keep_per_prompt={self.rs.keep_per_prompt} > sampling.n={self.sampling.n}")
        return self


# --- 1-3: sample, score, select ------------------------------------------------------------


def sample_and_select(run: Run, cfg: Config, model, tokenizer, records: list[Record], reward) -> tuple[list, dict]:
    """This process's share of the prompts: N samples each, scored one sampling batch at a time; returns
    the kept rows [{"prompt", "response", "reward"}] of the share and summed rollout statistics."""
    rs, d, n = cfg.rs, run.dist, cfg.sampling.n
    mine = list(range(d.rank, len(records), d.world_size))
    share = [records[i] for i in mine]
    prompt_ids = render_prompts(tokenizer, share, cfg.data.chat_template)
    # A batch's seed follows its first prompt's index in the dataset: the same samples on any number of processes.
    base = cfg.train.seed if cfg.sampling.seed is None else cfg.sampling.seed
    kept, sums = [], {"reward": 0.0, "reward_kept": 0.0, "tokens": 0.0, "ended": 0.0, "samples": 0.0, "kept": 0.0}
    engine = build_engine(model, tokenizer, cfg.sampling, run.autocast)
    for start, completions in sample_batches(engine, prompt_ids, cfg.sampling, lambda s: base + mine[s]):
        chunk = share[start : start + cfg.sampling.batch_size]
        rewards = reward(
            [chunk[c.prompt_index].data for c in completions], [c.text for c in completions]
        ).rewards.tolist()
        for i, record in enumerate(chunk):
            group = list(zip(rewards[i * n : (i + 1) * n], completions[i * n : (i + 1) * n]))  # (N) of prompt i
            eligible = [
                (r, c)
                for r, c in group
                if (c.is_end or rs.keep_unended) and (rs.min_reward is None or r >= rs.min_reward)
            ]
            best = sorted(eligible, key=lambda rc: -rc[0])[: rs.keep_per_prompt]  # stable: earlier wins ties
            prompt = record.data["prompt"] if "prompt" in record.data else prompt_messages(record)
            kept += [{"prompt": prompt, "response": c.text, "reward": r} for r, c in best]
            sums["reward"] += sum(r for r, _ in group)
            sums["reward_kept"] += sum(r for r, _ in best)
            sums["tokens"] += sum(len(c.token_ids) for _, c in group)
            sums["ended"] += sum(c.is_end for _, c in group)
            sums["samples"] += len(group)
            sums["kept"] += len(best)
    return kept, sums


# --- 4: fine-tune on the kept samples --------------------------------------------------------


def _encode_kept(rows: list[dict], cfg: Config, tokenizer, where: str):
    stats, examples = EncodeStats(total=len(rows)), []
    for i, row in enumerate(rows):
        answer = {"role": "assistant", "content": row["response"]}
        messages = [*prompt_messages(Record(row, f"{where}:{i + 1}")), answer]
        example = fit_length(
            encode_conversation(tokenizer, messages, cfg.data.chat_template, f"{where}:{i + 1}"),
            cfg.data.max_seq_len,
            cfg.data.overlength,
            stats,
        )
        if example is not None:
            examples.append(example)
    stats.kept = len(examples)
    return examples, stats


def main(cfg: Config) -> None:
    run = start_run(cfg)
    rs = cfg.rs
    records = read_prompt_records(cfg.data.train.path, cfg.data.train.split, cfg.data.train.limit)
    reward = build_reward_source(cfg.reward)
    rollout_log = iteration_logger(run, rs.iterations, "kept.jsonl")

    for t in range(1, rs.iterations + 1):
        it_run = iteration_run(run, t)  # trains from the previous iteration's final model
        if it_run is None:
            continue
        out = it_run.output_dir
        tokenizer = load_tokenizer(it_run.cfg.model)
        model = load_causal_lm(it_run.cfg.model, tokenizer, seed=cfg.train.seed).to(run.dist.device)

        # --- 1-3. sample N per prompt, score, keep the best k (reused when resuming) ------------
        samples = out / "kept.jsonl"
        if samples.is_file():
            kept = [json.loads(line) for line in samples.read_text().splitlines()]
            run.log.info(f"iteration {t}: reusing {len(kept)} kept samples from {samples}")
        else:
            kept, sums = gather_rollouts(*sample_and_select(run, cfg, model, tokenizer, records, reward), run.dist)
            n = max(sums["samples"], 1)
            metrics = {
                "rollout/reward": sums["reward"] / n,
                "rollout/reward_kept": sums["reward_kept"] / max(sums["kept"], 1),
                "rollout/response_tokens": sums["tokens"] / n,
                "rollout/ended_fraction": sums["ended"] / n,
                "rollout/kept": sums["kept"],
            }
            rollout_log.log(t, metrics)
            run.log.info(f"iteration {t}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if run.dist.is_main:
                write_jsonl(kept, samples)
            barrier(run.dist)
        if not kept:
            raise ConfigError(
                f"iteration {t}: no sample was kept (rs.min_reward={rs.min_reward}, rs.keep_unended={rs.keep_unended})"
            )

        # --- 4. SFT on the kept samples -----------------------------------------------------------
        examples, stats = _encode_kept(kept, cfg, tokenizer, str(samples))
        run.log.info(f"iteration {t}: training on {stats.summary()}")
        collate = partial(collate_rows, pad_id=tokenizer.pad_token_id)
        # sampling above used the whole model on every rank; training may split it (tensor parallel)
        model = fit(
            it_run, model, make_rows(examples, cfg.data), row_length, collate, sft_token_loss, tensor_parallel=True
        )
        save_final(it_run, model, tokenizer)
        barrier(run.dist)
        del model

    rollout_log.close()
    copy_last_iteration(run, rs.iterations)
