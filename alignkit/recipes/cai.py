"""Constitutional AI: critique-and-revision SFT (SL-CAI), then AI-labelled preferences (RL-CAI).

Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback". A written constitution and a
feedback model replace human harm labels (the constitution file: `alignkit.data.constitution`):

  SL-CAI  1. `sl_data`   the helpful-only policy (`model`) answers the red-team prompts (`data.train`);
                         for `sl.rounds` rounds a principle is drawn, the feedback model critiques
                         the current answer and then revises it (few-shot examples first); each
                         round's revision (`sl.train_on`) becomes an SFT target, blended with
                         helpfulness data (`sl.helpful`) so the model does not turn evasive: SFT
                         records as they are, and prompt-only records answered by the policy itself
                         (the paper's helpfulness samples of the helpful model).
          2. `sl_train`  SFT from `model` on the blend -> output_dir/sl/final (the SL-CAI model).
  RL-CAI  3. `rl_data`   the SL-CAI model answers each prompt `rl.n` times, one answer per temperature
                         of `rl.temperatures` (NeMo-Aligner: 0.01 .. 1.51); for each pair of distinct
                         answers a principle is drawn and the feedback model is asked which option is
                         better, "(A) ... (B) ...", in both orders (`rl.swap`). The label is soft: the
                         normalised probability of A against B from its log-probs (the paper), or its
                         text verdict where the endpoint gives none (`rl.label: verdict`, NeMo-Aligner's
                         way); the two orders are averaged (position bias cancels) and optionally
                         clamped. Pairs, oriented so the preferred answer is `chosen`, with
                         `preference` = P(chosen better), plus helpfulness pairs (`rl.helpful_pairs`,
                         preference 1) -> output_dir/rl_data/pairs.jsonl and prompts.jsonl.
          4. `rl_train`  `rl.trainer: dpo`: DPO from the SL-CAI model on the soft labels, the loss
                         -[p log sigma(beta h) + (1-p) log sigma(-beta h)] with h the log-ratio gap
                         (`losses.reward.soft_bradley_terry_loss`) -> output_dir/rl/final.
                         `rl.trainer: reward_model`: a Bradley-Terry reward model with soft targets
                         on the SL-CAI backbone -> output_dir/rl/reward_model/final, for the `ppo`
                         recipe on output_dir/rl_data/prompts.jsonl (the paper's RL-CAI).

The feedback model is any OpenAI-compatible chat endpoint (`cai.feedback.url`, model name, API key
from an environment variable: vLLM, a hosted API, `alignkit serve generate`), or a local model
directory, or (neither set) the policy itself, as in the paper's SL-CAI where the helpful model
critiques its own answers. Requests run concurrently with timeouts, retries and back-off, and every
answer is appended to output_dir/feedback_cache.jsonl as it arrives: a killed run started again
asks only what it had not been answered. Every step writes its files at its end and is skipped
when they exist; the training steps resume from their checkpoints. `cai.steps` runs any of them
alone (each reads what the steps before it wrote).

    alignkit run cai --config tiny
    alignkit run cai --config my.yaml model.path=runs/helpful/final \\
        cai.feedback.url=http://localhost:8000/v1 cai.feedback.model=mixtral
    alignkit run cai --config my.yaml cai.steps=[rl_data]
"""

from __future__ import annotations

import itertools
import random
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from transformers import AutoModelForSequenceClassification

from alignkit.config import (
    ConfigError,
    DataConfig,
    DatasetConfig,
    OptimConfig,
    RecipeConfig,
    SamplingConfig,
    Section,
    TrainConfig,
)
from alignkit.data.batching import collate_rows
from alignkit.data.constitution import (
    Constitution,
    clamp,
    comparison_messages,
    critique_messages,
    find_constitution,
    load_constitution,
    option_probability,
    revision_messages,
    swap_average,
    verdict_probability,
)
from alignkit.data.formats import prompt_messages, read_prompt_records
from alignkit.data.io import Record, read_records, write_jsonl
from alignkit.data.preference import collate_pairs, load_preference_pairs, pair_length
from alignkit.data.reward import collate_reward_pairs, load_reward_pairs
from alignkit.data.sft import load_sft_examples, make_rows, row_length
from alignkit.data.tokenize import IGNORE
from alignkit.generation.batches import sample_batches
from alignkit.generation.engine import build_engine
from alignkit.losses.reward import soft_bradley_terry_loss
from alignkit.models.forward import logits_at, sequence_logps, sft_token_loss
from alignkit.models.loading import load_causal_lm, load_sequence_scorer, load_tokenizer
from alignkit.models.reward import RewardModelInfo, sequence_scores
from alignkit.rewards.judge import JudgeConfig, LocalChat, chat_client
from alignkit.training.distributed import barrier, wrap_frozen
from alignkit.training.loop import Run, fit, save_final, start_run
from alignkit.training.rollouts import render_prompts

__all__ = ["CAIConfig", "Config", "FeedbackConfig", "RLConfig", "SLConfig", "main"]

STEPS = ("sl_data", "sl_train", "rl_data", "rl_train")


class FeedbackConfig(Section):
    """The model that critiques, revises and compares. url and model both None: the policy itself."""

    url: str | None = None  # an OpenAI-compatible base URL ending in /v1
    model: str | None = None  # the served model's name; without url: a local model directory
    api_key_env: str | None = "OPENAI_API_KEY"  # the environment variable holding the API key
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0.0)
    retries: int = Field(3, ge=0)
    temperature: float = Field(0.0, ge=0.0)  # critiques and revisions (comparisons are read at 0)


class SLConfig(Section):
    rounds: int = Field(1, ge=1)  # critique-revision rounds per prompt (the paper: up to 4; NeMo-Aligner: 1)
    # the policy's first answers (NeMo-Aligner: greedy)
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=128, temperature=0.0, seed=0)
    critique_tokens: int = Field(128, ge=1)
    revision_tokens: int = Field(128, ge=1)
    train_on: Literal["every_round", "last_round"] = "every_round"  # the paper trains on every round's revision
    # SFT records blended into the revisions; a record with a prompt only is answered by the policy (sampling)
    helpful: DatasetConfig | None = None
    helpful_per_revision: float | None = Field(1.0, ge=0.0)  # helpful records per revision; None: all


class RLConfig(Section):
    prompts: DatasetConfig | None = None  # default: data.train
    policy: str | None = None  # the model that samples (and rl_train starts from); default output_dir/sl/final
    temperatures: list[float] = Field(default_factory=lambda: [0.01, 0.51, 1.01, 1.51], min_length=2)
    max_new_tokens: int = Field(128, ge=1)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    batch_size: int = Field(32, ge=1)  # prompts per sampling batch
    seed: int = Field(0, ge=0)
    pairs: Literal["all", "adjacent"] = "all"  # every two distinct answers, or answers i and i+1
    label: Literal["logprobs", "verdict"] = "logprobs"  # logprobs falls back to the verdict where there are none
    swap: bool = True  # ask both orders and average
    clamp: tuple[float, float] | None = None  # e.g. [0.4, 0.6] for chain-of-thought labels
    whole_constitution: bool = False  # every principle in the system turn (NeMo-Aligner) besides the drawn one
    min_confidence: float = Field(0.0, ge=0.0, lt=0.5)  # drop pairs with |p - 0.5| below this
    helpful_pairs: DatasetConfig | None = None  # helpfulness comparisons blended in, preference 1
    trainer: Literal["dpo", "reward_model"] = "dpo"
    beta: float = Field(0.1, gt=0.0)  # DPO
    sft_weight: float = Field(0.0, ge=0.0)  # DPO: + sft_weight * NLL(chosen) per pair (RPO)
    optim: OptimConfig = OptimConfig(lr=1e-5)
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        if self.clamp is not None and not 0.0 <= self.clamp[0] <= 0.5 <= self.clamp[1] <= 1.0:
            raise ValueError(f"cai.rl.clamp must be [low, high] with 0 <= low <= 0.5 <= high <= 1, got {self.clamp}")
        return self


class CAIConfig(Section):
    constitution: str = "default"  # a YAML file, or the name of one in configs/cai/constitutions/
    feedback: FeedbackConfig = FeedbackConfig()
    steps: list[Literal["sl_data", "sl_train", "rl_data", "rl_train"]] = list(STEPS)
    seed: int = 0  # principle draws and the blend's order
    sl: SLConfig = SLConfig()
    rl: RLConfig = RLConfig()


class Config(RecipeConfig):
    data: DataConfig  # data.train: the red-team prompts; the lengths and template serve every step
    cai: CAIConfig = CAIConfig()
    # `optim` and `train` are the SL-CAI SFT's; RL-CAI's are cai.rl.optim and cai.rl.train.


# --- the feedback model ---------------------------------------------------------------------------


def feedback_client(cfg: Config, run: Run, policy: tuple):
    """The feedback model's client, caching to output_dir/feedback_cache.jsonl; with neither a URL
    nor a model set, `policy` (model, tokenizer), the step's own model, critiques itself."""
    fc = cfg.cai.feedback
    cache = run.output_dir / "feedback_cache.jsonl"
    if fc.url is None and fc.model is None:
        return LocalChat.from_model(policy[0], policy[1], "policy", batch_size=fc.concurrency, cache_path=cache)
    judge = JudgeConfig(
        url=fc.url,
        model=fc.model,
        api_key_env=fc.api_key_env,
        concurrency=fc.concurrency,
        timeout_s=fc.timeout_s,
        retries=fc.retries,
        cache_path=str(cache),
    )
    return chat_client(judge)


def _texts(answers: list[dict]) -> list[str]:
    return [(a["choices"][0]["message"].get("content") or "").strip() for a in answers]


# --- SL-CAI: answer, critique, revise -----------------------------------------------------------


def answer_prompts(model, tokenizer, records: list[Record], sampling: SamplingConfig, data: DataConfig) -> list[str]:
    """One answer per prompt (in order), sampled in batches seeded by sampling.seed + first index."""
    ids = render_prompts(tokenizer, records, data.chat_template, data.system_prompt)
    out: list[str] = [""] * len(ids)
    one = sampling.model_copy(update={"n": 1})
    seed = sampling.seed or 0
    with torch.no_grad():
        engine = build_engine(model, tokenizer, one)
        for start, completions in sample_batches(engine, ids, one, lambda s: seed + s):
            for k, c in enumerate(completions):
                out[start + k] = c.text.strip()
    return out


def critique_and_revise(
    client, constitution: Constitution, records: list[Record], answers: list[str], sl: SLConfig, fc, rng
) -> list[dict[str, Any]]:
    """`sl.rounds` rounds of (draw a principle, critique, revise) on every answer, each round on the
    previous round's revision; all prompts of a round go to the feedback model at once."""
    prompts = [prompt_messages(r) for r in records]
    chains = [{"prompt": r.data["prompt"], "initial": a, "rounds": []} for r, a in zip(records, answers)]
    current = list(answers)
    for _ in range(sl.rounds):
        principles = [rng.choice(constitution.principles) for _ in records]
        asks = [critique_messages(constitution, p, q, a) for p, q, a in zip(principles, prompts, current)]
        critiques = _texts(client.chat_many(asks, max_tokens=sl.critique_tokens, temperature=fc.temperature))
        asks = [
            revision_messages(constitution, p, q, a, c) for p, q, a, c in zip(principles, prompts, current, critiques)
        ]
        revisions = _texts(client.chat_many(asks, max_tokens=sl.revision_tokens, temperature=fc.temperature))
        for chain, p, c, r in zip(chains, principles, critiques, revisions):
            chain["rounds"].append({"principle": p.name, "critique": c, "revision": r})
        current = [r or a for r, a in zip(revisions, current)]  # an empty revision keeps the answer
    return chains


def revision_records(chains: list[dict[str, Any]], sl: SLConfig) -> list[dict[str, Any]]:
    """SFT records of the revisions: every round's, or the last (`sl.train_on`); empty ones dropped."""
    return [
        {"prompt": c["prompt"], "response": r["revision"]}
        for c in chains
        for r in (c["rounds"] if sl.train_on == "every_round" else c["rounds"][-1:])
        if r["revision"]
    ]


def pick_helpful(sl: SLConfig, revisions: int, rng) -> list[Record]:
    """`sl.helpful`'s records, shuffled, `sl.helpful_per_revision` of them per revision (None: all)."""
    if sl.helpful is None:
        return []
    helpful = read_records(sl.helpful.path, sl.helpful.split, sl.helpful.limit)
    rng.shuffle(helpful)
    if sl.helpful_per_revision is not None:
        helpful = helpful[: round(sl.helpful_per_revision * revisions)]
    return helpful


def is_prompt_only(record: Record) -> bool:
    return "response" not in record.data and "messages" not in record.data


def answer_helpful(model, tokenizer, helpful: list[Record], sl: SLConfig, data: DataConfig) -> list[dict[str, Any]]:
    """The helpful records as SFT records: prompt-only ones answered by `model` with `sl.sampling`
    (an empty answer dropped, as an empty revision is). Bai et al. blend in samples of the helpful RLHF
    model: its own answers pull its benign behaviour nowhere, where written ones pull it toward the
    writer's (on the task world the former kept the benign reward but not the refusal rate:
    docs/recipes/cai.md)."""
    asked = [r for r in helpful if is_prompt_only(r)]
    answers = iter(answer_prompts(model, tokenizer, asked, sl.sampling, data) if asked else [])
    records = [{**r.data, "response": next(answers)} if is_prompt_only(r) else r.data for r in helpful]
    return [r for r in records if r.get("response", True)]


def sl_blend(revisions: list[dict[str, Any]], helpful: list[dict[str, Any]], rng) -> list[dict[str, Any]]:
    """SFT records: the revisions and the helpful records, shuffled together."""
    blend = revisions + helpful
    rng.shuffle(blend)
    return blend


# --- RL-CAI: sample, compare, label -------------------------------------------------------------


def sample_answers(model, tokenizer, records: list[Record], rl: RLConfig, data: DataConfig) -> list[list[str]]:
    """(P, n) answers: answer j of every prompt at temperature rl.temperatures[j]."""
    answers: list[list[str]] = [[] for _ in records]
    for j, temperature in enumerate(rl.temperatures):
        sampling = SamplingConfig(
            max_new_tokens=rl.max_new_tokens,
            temperature=temperature,
            top_p=rl.top_p,
            top_k=rl.top_k,
            batch_size=rl.batch_size,
            seed=rl.seed + 100_003 * j,
        )
        for i, text in enumerate(answer_prompts(model, tokenizer, records, sampling, data)):
            answers[i].append(text)
    return answers


def candidate_pairs(answers: list[str], how: str) -> list[tuple[str, str]]:
    """Pairs of distinct non-empty answers: every two (in sample order), or consecutive ones."""
    distinct = list(dict.fromkeys(a for a in answers if a))
    if how == "adjacent":
        return list(zip(distinct, distinct[1:]))
    return list(itertools.combinations(distinct, 2))


def _probability(answer: dict, label: str) -> float | None:
    choice = answer["choices"][0]
    p = option_probability(choice) if label == "logprobs" else None
    return p if p is not None else verdict_probability(choice["message"].get("content") or "")


def label_pairs(
    client, constitution: Constitution, items: list[tuple[Any, str, str]], rl: RLConfig, rng
) -> tuple[list[dict[str, Any]], int]:
    """Soft labels for (prompt, first, second) items: P(first better) from the option probabilities,
    averaged over both orders when rl.swap, clamped when rl.clamp. Returns one record per labelled
    pair (oriented: `chosen` is the preferred one) and the count of unreadable answers (pairs left out)."""
    principles = [rng.choice(constitution.principles) for _ in items]
    params: dict[str, Any] = {"temperature": 0.0}
    params.update(
        {"max_tokens": 3, "logprobs": True, "top_logprobs": 20} if rl.label == "logprobs" else {"max_tokens": 8}
    )

    def ask(order: int) -> list[float | None]:
        asks = [
            comparison_messages(constitution, p, messages, *((a, b) if order == 0 else (b, a)), rl.whole_constitution)
            for p, (messages, a, b) in zip(principles, items)
        ]
        return [_probability(answer, rl.label) for answer in client.chat_many(asks, **params)]

    as_a = ask(0)
    as_b = ask(1) if rl.swap else [None] * len(items)
    records, unread = [], 0
    for (messages, first, second), principle, pa, pb in zip(items, principles, as_a, as_b):
        if pa is None or (rl.swap and pb is None):
            unread += 1
            continue
        p = swap_average(pa, pb) if rl.swap else pa
        if rl.clamp is not None:
            p = clamp(p, *rl.clamp)
        if abs(p - 0.5) < rl.min_confidence:
            continue
        chosen, rejected = (first, second) if p >= 0.5 else (second, first)
        records.append(
            {
                "prompt": messages,
                "chosen": chosen,
                "rejected": rejected,
                "preference": round(max(p, 1 - p), 6),
                "first": first,
                "p_first_as_a": pa,
                "p_first_as_b": pb,
                "principle": principle.name,
            }
        )
    return records, unread


# --- training steps (the SFT, DPO and reward-model machinery) -------------------------------------


def sub_run(run: Run, name: str, model_path: str | None, **updates) -> Run:
    """A training run of its own in output_dir/NAME, from `model_path` (None: the recipe's model)."""
    cfg = run.cfg
    model = cfg.model
    if model_path is not None:
        model = model.model_copy(update={"path": model_path, "random_init": None, "tokenizer_path": None})
    out = run.output_dir / name
    if run.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(run.dist)
    return Run(
        cfg=cfg.model_copy(update={"model": model, "output_dir": str(out), **updates}), dist=run.dist, output_dir=out
    )


def sft_step(run: Run, data_path: Path) -> None:
    """SFT on the blend: the `sft` recipe's calls, from the recipe's model."""
    cfg = run.cfg
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed)
    examples, stats = load_sft_examples(DatasetConfig(path=str(data_path)), cfg.data, tokenizer)
    run.log.info(f"SL-CAI data {data_path}: {stats.summary()}")
    collate = partial(collate_rows, pad_id=tokenizer.pad_token_id)
    model = fit(run, model, make_rows(examples, cfg.data), row_length, collate, sft_token_loss)
    save_final(run, model, tokenizer)


def _pair_logps(model, batch) -> torch.Tensor:
    """(2P,) summed response log-probs, interleaved [chosen_0, rejected_0, ...]."""
    select = batch["target_ids"] != IGNORE  # (B, T)
    logits = logits_at(model, batch["input_ids"], batch["position_ids"], select)  # (N, V)
    return sequence_logps(logits, batch["target_ids"][select], batch["seq_index"], batch["seq_num_targets"].numel())


def soft_dpo_loss(policy, batch, reference, beta: float, sft_weight: float):
    """DPO with soft labels: soft Bradley-Terry on beta * (log pi/pi_ref)(chosen) - (...)(rejected)."""
    logps = _pair_logps(policy, batch)  # (2P,)
    with torch.no_grad():
        ref = _pair_logps(reference, batch)
    chosen = beta * (logps[0::2] - ref[0::2])  # (P,) implicit rewards
    rejected = beta * (logps[1::2] - ref[1::2])
    loss, metrics = soft_bradley_terry_loss(chosen, rejected, batch["preference"].to(chosen.device))
    counts = batch["seq_num_targets"].to(logps.dtype)
    nll = -(logps[0::2] / counts[0::2]).sum()  # per-token NLL of each chosen answer, summed over pairs
    metrics["sft_loss"] = nll.detach()
    return loss + sft_weight * nll, metrics


def _with_preferences(collate, preferences: dict[str, float]):
    def collate_with(items):
        batch = collate(items)
        real = [items[i] for i in batch["order"]]
        batch["preference"] = torch.tensor([preferences[p.source] for p in real], dtype=torch.float32)
        return batch

    return collate_with


def dpo_step(run: Run, pairs_path: Path) -> None:
    """Soft-label DPO from the run's model, which is also the frozen reference."""
    cfg, rl = run.cfg, run.cfg.cai.rl
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed)
    reference = wrap_frozen(load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed), run.dist, cfg.distributed)
    pairs, stats = load_preference_pairs(DatasetConfig(path=str(pairs_path)), cfg.data, tokenizer)
    run.log.info(f"RL-CAI pairs {pairs_path}: {stats.summary().replace('examples', 'pairs')}")
    if not pairs:
        raise ConfigError(f"no RL-CAI pair left after data.overlength={cfg.data.overlength}")
    preferences = {r.source: float(r.data["preference"]) for r in read_records(str(pairs_path))}
    collate = _with_preferences(partial(collate_pairs, pad_id=tokenizer.pad_token_id), preferences)
    loss = partial(soft_dpo_loss, reference=reference, beta=rl.beta, sft_weight=rl.sft_weight)
    model = fit(run, model, pairs, pair_length, collate, loss)
    save_final(run, model, tokenizer)


def soft_reward_loss(model, batch):
    rewards = sequence_scores(model, batch["input_ids"], batch["position_ids"], batch["ends"])[:, 0]  # (2P,)
    return soft_bradley_terry_loss(rewards[0::2], rewards[1::2], batch["preference"].to(rewards.device))


def reward_model_step(run: Run, pairs_path: Path) -> None:
    """A Bradley-Terry reward model with soft targets on the run's model's backbone (a new head)."""
    cfg = run.cfg
    tokenizer = load_tokenizer(cfg.model)
    model = load_sequence_scorer(cfg.model, tokenizer, num_labels=1, seed=cfg.train.seed)
    pairs, stats = load_reward_pairs(DatasetConfig(path=str(pairs_path)), cfg.data, tokenizer)
    run.log.info(f"RL-CAI pairs {pairs_path}: {stats.summary().replace('examples', 'pairs')}")
    preferences = {r.source: float(r.data["preference"]) for r in read_records(str(pairs_path))}
    base = partial(collate_reward_pairs, pad_id=tokenizer.pad_token_id)

    def collate(items):
        batch = base(items)
        chosen = [items[i].chosen.source for i in batch["order"]]
        batch["preference"] = torch.tensor([preferences[s] for s in chosen], dtype=torch.float32)
        return batch

    model = fit(
        run, model, pairs, lambda p: len(p.chosen.input_ids) + len(p.rejected.input_ids), collate, soft_reward_loss
    )
    info = RewardModelInfo(["reward"], [1.0])
    save_final(run, model, tokenizer, info.config_updates(), AutoModelForSequenceClassification)


# --- the recipe ---------------------------------------------------------------------------------


def _done(path: Path) -> bool:
    return path.is_file() or (path / "config.json").is_file()


def main(cfg: Config) -> None:
    run = start_run(cfg)
    c, out, d = cfg.cai, run.output_dir, run.dist
    constitution = load_constitution(find_constitution(c.constitution))
    run.log.info(
        f"constitution {constitution.source}: {len(constitution.principles)} principles, "
        f"{len(constitution.few_shot)} few-shot examples; steps {', '.join(c.steps)}"
    )
    sl_data, sl_final = out / "sl_data" / "train.jsonl", out / "sl" / "final"
    pairs_path = out / "rl_data" / "pairs.jsonl"
    policy_path = c.rl.policy or str(sl_final)

    # --- SL-CAI 1: the helpful-only policy answers; the feedback model critiques and revises ----
    if "sl_data" in c.steps and not _done(sl_data):
        if d.is_main:
            records = read_prompt_records(cfg.data.train.path, cfg.data.train.split, cfg.data.train.limit)
            tokenizer = load_tokenizer(cfg.model)
            model = load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed).to(d.device).eval()
            answers = answer_prompts(model, tokenizer, records, c.sl.sampling, cfg.data)
            client = feedback_client(cfg, run, (model, tokenizer))
            rng = random.Random(f"cai-sl:{c.seed}")
            chains = critique_and_revise(client, constitution, records, answers, c.sl, c.feedback, rng)
            write_jsonl(chains, out / "sl_data" / "chains.jsonl")
            revisions = revision_records(chains, c.sl)
            picked = pick_helpful(c.sl, len(revisions), rng)
            helpful = answer_helpful(model, tokenizer, picked, c.sl, cfg.data)
            write_jsonl(sl_blend(revisions, helpful, rng), sl_data)
            asked = sum(map(is_prompt_only, picked))
            run.log.info(
                f"SL-CAI: {len(chains)} prompts x {c.sl.rounds} critique-revision rounds; {len(revisions)} revisions "
                f"+ {len(helpful)} helpful records ({asked} answered by the policy) -> {sl_data}"
            )
        barrier(d)

    # --- SL-CAI 2: SFT on the revisions blended with helpful data --------------------------------
    if "sl_train" in c.steps and not _done(sl_final):
        _need(sl_data, "sl_train", "sl_data")
        sft_step(sub_run(run, "sl", None), sl_data)

    # --- RL-CAI 1: the SL-CAI model samples at several temperatures; AI labels both orders -------
    if "rl_data" in c.steps and not _done(pairs_path):
        _need(Path(policy_path) / "config.json", "rl_data", "sl_train (or set cai.rl.policy)")
        if d.is_main:
            spec = c.rl.prompts or cfg.data.train
            records = read_prompt_records(spec.path, spec.split, spec.limit)
            policy_cfg = sub_run(run, "rl_data", policy_path).cfg.model
            tokenizer = load_tokenizer(policy_cfg)
            model = load_causal_lm(policy_cfg, tokenizer).to(d.device).eval()
            answers = sample_answers(model, tokenizer, records, c.rl, cfg.data)
            write_jsonl(
                [{"prompt": r.data["prompt"], "answers": a} for r, a in zip(records, answers)],
                out / "rl_data" / "samples.jsonl",
            )
            items = [
                (r.data["prompt"], a, b)
                for r, options in zip(records, answers)
                for a, b in candidate_pairs(options, c.rl.pairs)
            ]
            client = feedback_client(cfg, run, (model, tokenizer))
            rows, unread = label_pairs(client, constitution, items, c.rl, random.Random(f"cai-rl:{c.seed}"))
            if c.rl.helpful_pairs is not None:
                spec = c.rl.helpful_pairs
                rows += [{**r.data, "preference": 1.0} for r in read_records(spec.path, spec.split, spec.limit)]
            write_jsonl([{"prompt": r.data["prompt"]} for r in records], out / "rl_data" / "prompts.jsonl")
            write_jsonl(rows, pairs_path)
            run.log.info(
                f"RL-CAI: {len(items)} AI comparisons of {len(records)} prompts x {len(c.rl.temperatures)} answers "
                f"({'both orders' if c.rl.swap else 'one order'}); {unread} unreadable; "
                f"{len(rows)} pairs -> {pairs_path}"
            )
        barrier(d)

    # --- RL-CAI 2: DPO on the soft labels, or a soft-label reward model for PPO ------------------
    if "rl_train" in c.steps:
        _need(pairs_path, "rl_train", "rl_data")
        rl_cfg = {"optim": c.rl.optim, "train": c.rl.train}
        if c.rl.trainer == "dpo" and not _done(out / "rl" / "final"):
            dpo_step(sub_run(run, "rl", policy_path, **rl_cfg), pairs_path)
        elif c.rl.trainer == "reward_model" and not _done(out / "rl" / "reward_model" / "final"):
            reward_model_step(sub_run(run, "rl/reward_model", policy_path, **rl_cfg), pairs_path)


def _need(path: Path, step: str, before: str) -> None:
    if not path.exists():
        raise ConfigError(f"cai step {step} needs {path}: run step {before} first")
