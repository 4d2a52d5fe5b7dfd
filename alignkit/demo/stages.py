"""The demo's stages: the task world's data, a home-grown base model, and each alignment recipe on
it, evaluated on the same held-out prompts with the same sampling.

Each stage is a function of the `Demo` (its output folder, configs/demo.yaml's settings, the
results of the stages before it) that runs a recipe with configs/demo/STAGE.yaml and returns its
metrics. `STAGES` is the table the pipeline runs; `DemoConfig` is the schema of configs/demo.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from transformers import AutoConfig

from alignkit.config import SamplingConfig, Section, configs_dir, find_config, load_config
from alignkit.data.formats import read_prompt_records
from alignkit.data.io import Record, write_jsonl
from alignkit.data.steerlm import SteerLMFormat
from alignkit.data.taskworld import build_datasets
from alignkit.demo.cai import CAISettings, cai_stage
from alignkit.demo.common import Demo, Stage, evaluate, read_jsonl, train, train_on_ray
from alignkit.demo.pipeline import run_pipeline
from alignkit.demo.rl_variants import (
    OnPolicyDistillSettings,
    RLVariantsSettings,
    onpolicy_distill_stage,
    rl_variants_stage,
)
from alignkit.diffusion.images import save_grid
from alignkit.diffusion.inference import generate_images, load_for_images
from alignkit.diffusion.pipeline import save_pipeline
from alignkit.diffusion.pretrain import pretrain_shape_pipeline
from alignkit.diffusion.reward import ShapeJudge, train_shape_judge
from alignkit.diffusion.sampling import diversity_by_prompt
from alignkit.evaluation.stats import mean_with_ci
from alignkit.evaluation.steering import attribute_control
from alignkit.models.loading import load_for_eval
from alignkit.models.tokenizer import train_bpe_tokenizer
from alignkit.recipes.draftp import Config as DraftpRecipeConfig
from alignkit.rewards.local import LocalRewardModel
from alignkit.tasks.datasets import STEERABLE_ATTRIBUTES, DatasetSizes, steer_prompt_records
from alignkit.tasks.oracle import oracle_rewards
from alignkit.tasks.shapes import caption_records
from alignkit.training.logging import get_logger
from alignkit.training.sampled_pairs import sampled_preference_pairs

__all__ = ["DEFAULT_STAGES", "DEMO_VERSION", "STAGES", "DemoConfig", "run_demo"]

# Bump when a change to the code behind the stages should invalidate cached results.
DEMO_VERSION = 4


# --- the settings: configs/demo.yaml ----------------------------------------------------------


class DataSettings(Section):
    seed: int
    sizes: dict[str, int]  # fields of alignkit.tasks.datasets.DatasetSizes (missing ones: its defaults)

    @model_validator(mode="after")
    def _known_sizes(self) -> DataSettings:
        unknown = set(self.sizes) - set(DatasetSizes.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"data.sizes: unknown dataset(s) {sorted(unknown)}; known: "
                f"{', '.join(DatasetSizes.__dataclass_fields__)}"
            )
        return self


class TokenizerSettings(Section):
    vocab_size: int = Field(ge=256)
    spell_quoted: bool = False  # one token per letter of a quoted word (alignkit.models.tokenizer.QUOTED_LETTER)


class EvaluationSettings(Section):
    sampling: SamplingConfig  # every model stage answers the held-out prompts with it


class RewardModelSettings(Section):
    # The SFT model's answers to each of the first `prompts` training prompts (n of them) whose
    # oracle comparisons join the Bradley-Terry data; the held-out comparisons sample with seed + 1.
    sampling: SamplingConfig
    prompts: int | None = Field(None, ge=1)  # None: all of prompts.jsonl


class SteeringSettings(Section):
    annotator: Literal["oracle", "attribute_model"]  # who labels SteerLM's training responses
    base: dict[str, int]  # what every steering request asks for besides the steered attribute
    best: dict[str, int]  # "the best answer": base plus these
    eval_prompts: int = Field(ge=1)  # held-out prompts x 5 levels x each steerable attribute
    steerlm2_prompts: int = Field(ge=1)  # SteerLM 2.0's training prompts (random targets)

    @property
    def best_targets(self) -> dict[str, int]:
        return {**self.base, **self.best}


class DraftpSettings(Section):
    pretrain_steps: int = Field(ge=1)  # the shape world's UNet pretraining
    eval_seeds: list[int]  # every caption sampled with each (not the training seeds)
    grid_prompts: int = Field(ge=1)  # captions in draftp_grid.png


class DemoConfig(Section):
    data: DataSettings
    tokenizer: TokenizerSettings
    evaluation: EvaluationSettings
    reward_model: RewardModelSettings
    steering: SteeringSettings
    draftp: DraftpSettings
    cai: CAISettings = CAISettings()  # stage cai (alignkit/demo/cai.py)
    rl_variants: RLVariantsSettings = RLVariantsSettings()  # stage rl_variants (alignkit/demo/rl_variants.py)
    onpolicy_distill: OnPolicyDistillSettings = OnPolicyDistillSettings()


# --- helpers the stages share -----------------------------------------------------------------


# --- data, tokenizer, base, SFT ---------------------------------------------------------------


def _data(demo: Demo) -> dict[str, Any]:
    data = demo.settings.data
    paths = build_datasets(demo.path("data"), seed=data.seed, sizes=DatasetSizes(**data.sizes))
    return {"files": {name: str(p) for name, p in paths.items()}}


def _tokenizer(demo: Demo) -> dict[str, Any]:
    texts = [r["text"] for r in read_jsonl(demo.path("data", "pretrain.jsonl"))]
    settings = demo.settings.tokenizer
    tokenizer = train_bpe_tokenizer(texts, vocab_size=settings.vocab_size, spell_quoted=settings.spell_quoted)
    tokenizer.save_pretrained(demo.path("tokenizer"))
    return {"vocab_size": len(tokenizer)}


def _base(demo: Demo) -> dict[str, Any]:
    train(
        demo,
        "base",
        [f"model.tokenizer_path={demo.path('tokenizer')}", f"data.train.path={demo.path('data', 'pretrain.jsonl')}"],
    )
    return evaluate(demo, "base")


def _sft(demo: Demo) -> dict[str, Any]:
    train(
        demo,
        "sft",
        [
            f"model.path={demo.path('base', 'final')}",
            f"data.train.path={demo.path('data', 'sft.jsonl')}",
            f"data.validation.path={demo.path('data', 'sft_valid.jsonl')}",
        ],
    )
    return evaluate(demo, "sft", reference="base")


# --- preference learning: DPO and the reward models -------------------------------------------


def _dpo(demo: Demo) -> dict[str, Any]:
    """Iterative on-policy DPO from the SFT model (the `dpo` recipe's `online` option): each
    iteration the current model answers the training prompts, the oracle's best and worst answers
    become pairs, and DPO trains from (and against) the current model."""
    cfg = train(
        demo,
        "dpo",
        [
            f"model.path={demo.path('sft', 'final')}",
            f"data.train.path={demo.path('data', 'prompts.jsonl')}",
            f"data.validation.path={demo.path('data', 'prefs_valid.jsonl')}",
        ],
    )
    metrics = evaluate(demo, "dpo", reference="sft")
    metrics["pairs_per_round"] = [
        len(read_jsonl(demo.path("dpo", f"iteration_{t}", "pairs.jsonl"))) for t in range(1, cfg.online.iterations + 1)
    ]
    return metrics


def _reward_model(demo: Demo) -> dict[str, Any]:
    """A Bradley-Terry reward model from the SFT model.

    It learns from the demonstrator's oracle-judged pairs plus comparisons of the SFT model's own
    answers (reward_model.sampling.n per training prompt, every pair the oracle separates, as
    InstructGPT collects comparisons of its SFT model's outputs): rejection sampling and PPO rank
    the SFT model's answers, which the demonstrator's pairs alone rank worse (on-policy pairwise
    accuracy 0.72 without them, 0.89 with). Reported: pairwise accuracy on the demonstrator's
    held-out pairs and on the SFT model's answers to held-out (`valid`) prompts."""
    sft = demo.path("sft", "final")
    settings = demo.settings.reward_model
    sampling = settings.sampling
    train_prompts = read_prompt_records(str(demo.path("data", "prompts.jsonl")))[: settings.prompts]
    # The held-out pairs' prompts alone: the oracle judges by the prompt text, as for any prompt.
    valid_prompts = [
        Record({"prompt": r["prompt"]}, f"prefs_valid.jsonl:{i + 1}")
        for i, r in enumerate(read_jsonl(demo.path("data", "prefs_valid.jsonl")))
    ]
    out = demo.path("reward_model")
    out.mkdir(parents=True, exist_ok=True)
    # Every pair of the SFT model's answers (sampling.n per prompt) that the oracle separates.
    model, tokenizer = load_for_eval(sft)
    onpolicy, _ = sampled_preference_pairs(model, tokenizer, train_prompts, sampling, oracle_rewards, all_pairs=True)
    held_out, _ = sampled_preference_pairs(
        model,
        tokenizer,
        valid_prompts,
        sampling.model_copy(update={"seed": sampling.seed + 1}),
        oracle_rewards,
        all_pairs=True,
    )
    del model
    demonstrator = read_jsonl(demo.path("data", "prefs.jsonl"))
    write_jsonl(demonstrator + onpolicy, out / "bt_train.jsonl")
    write_jsonl(held_out, out / "onpolicy_valid.jsonl")
    get_logger().info(
        f"demo: reward model: {len(demonstrator)} demonstrator pairs + {len(onpolicy)} comparisons "
        f"of the SFT model's answers to {len(train_prompts)} prompts ({sampling.n} per prompt); "
        f"{len(held_out)} held-out comparisons"
    )
    train(
        demo,
        "reward_model",
        [
            f"model.path={sft}",
            f"data.train.path={out / 'bt_train.jsonl'}",
            f"data.validation.path={demo.path('data', 'prefs_valid.jsonl')}",
        ],
        output=out / "bt",
    )
    bt = json.loads((out / "bt" / "eval.json").read_text())
    correct = round(bt["pairwise_accuracy"] * bt["pairs"])
    metrics = mean_with_ci("pairwise_accuracy", [1.0] * correct + [0.0] * (bt["pairs"] - correct))
    metrics["pairs"] = bt["pairs"]
    rm = LocalRewardModel(out / "bt" / "final", batch_size=64)
    chosen = rm.score([r["prompt"] for r in held_out], [r["chosen"] for r in held_out]).rewards
    rejected = rm.score([r["prompt"] for r in held_out], [r["rejected"] for r in held_out]).rewards
    metrics.update(mean_with_ci("onpolicy_pairwise_accuracy", (chosen > rejected).float().tolist()))
    metrics.update(
        {
            "onpolicy_pairs": len(held_out),
            "train_pairs_demonstrator": len(demonstrator),
            "train_pairs_onpolicy": len(onpolicy),
        }
    )
    return metrics


def _attribute_model(demo: Demo) -> dict[str, Any]:
    """A SteerLM attribute model (multi-attribute regression) from the SFT model on the oracle's
    0-4 labels: mean absolute error and Pearson r of each predicted attribute with the oracle's, on
    held-out responses. SteerLM's annotator when steering.annotator is attribute_model."""
    out = demo.path("attribute_model")
    train(
        demo,
        "attribute_model",
        [
            f"model.path={demo.path('sft', 'final')}",
            f"data.train.path={demo.path('data', 'attributes.jsonl')}",
            f"data.validation.path={demo.path('data', 'attributes_valid.jsonl')}",
        ],
        output=out,
    )
    attributes = json.loads((out / "eval.json").read_text())
    return {k: v for k, v in attributes.items() if k.startswith(("pearson/", "mae/"))}


def _rejection_sampling(demo: Demo) -> dict[str, Any]:
    """Best-of-4 by the stage `reward_model`'s Bradley-Terry model (the oracle only evaluates)."""
    train(
        demo,
        "rejection_sampling",
        [
            f"model.path={demo.path('sft', 'final')}",
            f"data.train.path={demo.path('data', 'prompts.jsonl')}",
            f"reward.path={demo.path('reward_model', 'bt', 'final')}",
        ],
    )
    return evaluate(demo, "rejection_sampling", reference="sft")


# --- SteerLM and SteerLM 2.0 ------------------------------------------------------------------


def _steer_metrics(demo: Demo, stage: str) -> dict[str, Any]:
    """Oracle reward when asked for the best attributes, and attribute control: for each steerable
    attribute and each level 0..4, greedy answers to steering.eval_prompts held-out prompts,
    measured by the oracle (the SFT model, shown the same labels, is the baseline that ignores them)."""
    steering = demo.settings.steering
    metrics = evaluate(demo, stage, reference="sft", attributes=steering.best_targets)
    metrics["asked"] = steering.best_targets
    every = demo.eval_prompts()
    prompts = every[:: len(every) // steering.eval_prompts][: steering.eval_prompts]
    model = demo.path(stage, "final")
    metrics.update(attribute_control(model, prompts, list(STEERABLE_ATTRIBUTES), steering.base))
    if stage == "steerlm":
        fmt = SteerLMFormat.from_config(AutoConfig.from_pretrained(model))
        sft = attribute_control(
            demo.path("sft", "final"), prompts, list(STEERABLE_ATTRIBUTES), steering.base, steer=fmt
        )
        metrics.update({f"sft_{k}": v for k, v in sft.items()})
    return metrics


def _steerlm(demo: Demo) -> dict[str, Any]:
    """Attribute-conditioned SFT from the SFT model on mixed-quality and good responses, each
    labelled by steering.annotator; then asked for the best attributes, and steered."""
    lines = [r for name in ("attributes.jsonl", "sft.jsonl") for r in read_jsonl(demo.path("data", name))]
    demo.path("steerlm").mkdir(parents=True, exist_ok=True)
    write_jsonl(
        [{"prompt": r["prompt"], "response": r["response"]} for r in lines], demo.path("steerlm", "responses.jsonl")
    )
    annotator = (
        ["annotate.kind=oracle"]
        if demo.settings.steering.annotator == "oracle"
        else [f"annotate.path={demo.path('attribute_model', 'final')}"]
    )
    train(
        demo,
        "steerlm",
        [
            f"model.path={demo.path('sft', 'final')}",
            f"data.train.path={demo.path('steerlm', 'responses.jsonl')}",
            *annotator,
        ],
    )
    return _steer_metrics(demo, "steerlm")


def _steerlm2(demo: Demo) -> dict[str, Any]:
    """SteerLM 2.0 from the SteerLM model on random (verbosity, politeness) targets, the other
    attributes at their best; log P(a|x,y) from the oracle's measurement of correctness and the steered
    attributes (configs/demo/steerlm2.yaml), log P(y|x) from the SFT model."""
    steering = demo.settings.steering
    demo.path("steerlm2").mkdir(parents=True, exist_ok=True)
    targets = [
        {**r, "attributes": {**steering.base, **r["attributes"]}}
        for r in steer_prompt_records(steering.steerlm2_prompts, seed=0)
    ]
    write_jsonl(targets, demo.path("steerlm2", "targets.jsonl"))
    train(
        demo,
        "steerlm2",
        [
            f"model.path={demo.path('steerlm', 'final')}",
            f"data.train.path={demo.path('steerlm2', 'targets.jsonl')}",
            f"steerlm2.prior_path={demo.path('sft', 'final')}",
        ],
    )
    return _steer_metrics(demo, "steerlm2")


# --- RL: PPO and GRPO -------------------------------------------------------------------------


def _rl_curves(stage: str, demo: Demo) -> dict[str, list[float]]:
    """Per logged step: the trained-on reward, the oracle's (monitor) reward and the KL, from metrics.jsonl."""
    rows = read_jsonl(demo.path(stage, "metrics.jsonl"))
    keys = {"step": "step", "reward": "rollout/reward", "oracle": "rollout/monitor_reward", "kl": "rollout/kl"}
    return {name: [r[key] for r in rows if key in r] for name, key in keys.items()}


def _reward_hacking(demo: Demo, stage: str) -> dict[str, Any]:
    """Where the reward model and the oracle disagree: both score the held-out answers of SFT and of
    `stage`; per skill, the change of each. A skill whose reward-model score rose while the oracle's
    reward fell is reward hacking."""
    rm = LocalRewardModel(demo.path("reward_model", "bt", "final"), normalize=True)
    by_task: dict[str, dict[str, float]] = {}
    for model in ("sft", stage):
        items = json.loads(demo.path(model, "eval.json").read_text())["items"]
        scores = rm.score([i["prompt"] for i in items], [i["response"] for i in items]).rewards.tolist()
        for item, score in zip(items, scores):
            t = by_task.setdefault(item["task"], {})
            for key, value in ((f"{model}_rm", score), (f"{model}_oracle", item["reward"]), (f"{model}_n", 1.0)):
                t[key] = t.get(key, 0.0) + value
    table = {
        task: {
            "rm_change": t[f"{stage}_rm"] / t[f"{stage}_n"] - t["sft_rm"] / t["sft_n"],
            "oracle_change": t[f"{stage}_oracle"] / t[f"{stage}_n"] - t["sft_oracle"] / t["sft_n"],
        }
        for task, t in sorted(by_task.items())
    }
    total = {k: sum(v[k] for v in table.values()) / len(table) for k in ("rm_change", "oracle_change")}
    hacked = [task for task, v in table.items() if v["rm_change"] > 0.05 and v["oracle_change"] < -0.01]
    return {
        "rm_change": total["rm_change"],
        "oracle_change": total["oracle_change"],
        "by_skill": table,
        "reward_hacked_skills": hacked,
    }


def _ppo(demo: Demo) -> dict[str, Any]:
    """PPO from the SFT model against the stage `reward_model`'s Bradley-Terry model (the oracle
    monitors the rollouts and judges the result); the critic starts from the reward model."""
    train(
        demo,
        "ppo",
        [
            f"model.path={demo.path('sft', 'final')}",
            f"data.train.path={demo.path('data', 'prompts.jsonl')}",
            f"reward.path={demo.path('reward_model', 'bt', 'final')}",
        ],
    )
    metrics = evaluate(demo, "ppo", reference="sft")
    metrics.update(_reward_hacking(demo, "ppo"))
    metrics["curves"] = _rl_curves("ppo", demo)
    return metrics


def _ppo_ray(demo: Demo) -> dict[str, Any]:
    """The `ppo` stage with its roles placed by Ray: the trainer on one Ray actor, generation on a
    second one that receives the weights by broadcast after every update (`--launcher ray`,
    `placement.generator.ranks=1`). Same config and seed: it should land where `ppo` did."""
    train_on_ray(
        demo,
        "ppo_ray",
        [
            f"model.path={demo.path('sft', 'final')}",
            f"data.train.path={demo.path('data', 'prompts.jsonl')}",
            f"reward.path={demo.path('reward_model', 'bt', 'final')}",
            "placement.generator.ranks=1",
        ],
        config="ppo",
    )
    metrics = evaluate(demo, "ppo_ray", reference="sft")
    metrics.update(_reward_hacking(demo, "ppo_ray"))
    metrics["curves"] = _rl_curves("ppo_ray", demo)
    return metrics


def _grpo(demo: Demo) -> dict[str, Any]:
    """GRPO from the SFT model against the oracle's check of the final answer (a verifiable reward)."""
    train(
        demo,
        "grpo",
        [f"model.path={demo.path('sft', 'final')}", f"data.train.path={demo.path('data', 'prompts.jsonl')}"],
    )
    metrics = evaluate(demo, "grpo", reference="sft")
    metrics["curves"] = _rl_curves("grpo", demo)
    return metrics


def _grpo_vllm(demo: Demo) -> dict[str, Any]:
    """The `grpo` stage with its samples drawn by vLLM (`sampling.backend=vllm`), the policy's weights
    pushed into the engine in memory after every update: its correctness should land within 0.02 of
    `grpo`'s; `logprob_abs_diff_max` is the largest engine-vs-trainer log-prob gap of the run."""
    train(
        demo,
        "grpo_vllm",
        [
            f"model.path={demo.path('sft', 'final')}",
            f"data.train.path={demo.path('data', 'prompts.jsonl')}",
            "sampling.backend=vllm",
        ],
        config="grpo",
    )
    metrics = evaluate(demo, "grpo_vllm", reference="sft")
    rows = read_jsonl(demo.path("grpo_vllm", "metrics.jsonl"))
    gaps = [r["rollout/logprob_abs_diff_max"] for r in rows if "rollout/logprob_abs_diff_max" in r]
    metrics["logprob_abs_diff_max"] = max(gaps, default=float("nan"))
    metrics["curves"] = _rl_curves("grpo_vllm", demo)
    return metrics


# --- DRaFT+ on the shape world ----------------------------------------------------------------


def _shapes(demo: Demo) -> dict[str, Any]:
    """The shape world for DRaFT+: a judge (the differentiable reward) and a pretrained base pipeline."""
    judge, judge_report = train_shape_judge(n=3000)
    judge.save(demo.path("shapes", "judge"))
    pipe, pretrain_report = pretrain_shape_pipeline(
        unet_steps=demo.settings.draftp.pretrain_steps, log=get_logger().info
    )
    save_pipeline(pipe, demo.path("shapes", "base"))
    return {"judge": judge_report, "pretrain": pretrain_report}


def _draftp(demo: Demo) -> dict[str, Any]:
    """DRaFT+ and plain DRaFT (kl_coeff 0) from the shape world's pretrained base pipeline, with the
    judge's differentiable reward; base, DRaFT and DRaFT+ sampled from the same prompts and seeds."""
    seeds = demo.settings.draftp.eval_seeds
    shapes = demo.path("shapes")
    runs = {"draftp": demo.path("draftp", "draftp_run"), "draft": demo.path("draftp", "draft_run")}
    common = [f"model.path={shapes / 'base'}", f"reward={shapes / 'judge'}"]
    train(demo, "draftp", common, output=runs["draftp"])
    train(demo, "draftp", [*common, "draftp.kl_coeff=0"], output=runs["draft"])

    cfg = load_config(DraftpRecipeConfig, find_config("demo", "draftp"), [f"output_dir={runs['draftp']}", *common])
    captions = [r["prompt"] for r in caption_records(90, seed=1)]
    judge = ShapeJudge.load(shapes / "judge")
    pipes = {name: load_for_images(None, run / "final") for name, run in runs.items()}
    samples = {}
    models = (
        ("base", pipes["draftp"], "base"),
        ("draft", pipes["draft"], "draft"),
        ("draftp", pipes["draftp"], "draft"),
        ("draftp_aig_linear", pipes["draftp"], "linear"),
    )
    for name, pipe, schedule in models:
        samples[name] = generate_images(
            pipe, captions, list(seeds), cfg.sampling.steps, cfg.sampling.guidance_scale, schedule
        )
    metrics = _image_metrics(samples, judge, captions, seeds)
    metrics["kl_coeff"] = cfg.draftp.kl_coeff
    _draftp_grid(demo, samples, captions)
    metrics["curves"] = {name: _draftp_curves(run) for name, run in runs.items()}
    metrics.update(demo.results["shapes"])  # the judge's accuracy, the pretraining report
    return metrics


def _image_metrics(samples: dict[str, torch.Tensor], judge, captions: list[str], seeds: list[int]) -> dict[str, Any]:
    """Reward, diversity (per caption, so that the interval is over captions) and distance to the
    base model's image for the same caption and seed, of each model's (P, S, C, H, W) images."""
    metrics: dict[str, Any] = {}
    per_caption: dict[str, list[float]] = {}
    for name, images in samples.items():
        with torch.no_grad():
            rewards = judge.reward(images.flatten(0, 1), [c for c in captions for _ in seeds])
        prefix = "" if name == "draftp" else f"{name}_"
        metrics.update(mean_with_ci(f"{prefix}reward", rewards.tolist()))
        per_caption[name] = diversity_by_prompt(images)
        metrics.update(mean_with_ci(f"{prefix}diversity", per_caption[name]))
        if name != "base":
            distance = (images - samples["base"]).pow(2).flatten(2).mean(-1).sqrt()  # (P, S) RMS
            metrics.update(mean_with_ci(f"{prefix}distance_to_base", distance.flatten().tolist()))
    # paired over captions (same captions and seeds): far tighter than comparing the two intervals
    for name, reference in (("draftp", "draft"), ("draftp", "base"), ("draft", "base")):
        gain = [a - b for a, b in zip(per_caption[name], per_caption[reference])]
        metrics.update(mean_with_ci(f"{'' if name == 'draftp' else name + '_'}diversity_gain_vs_{reference}", gain))
    metrics["diversity_kept"] = metrics["diversity"] / metrics["base_diversity"]
    metrics["draft_diversity_kept"] = metrics["draft_diversity"] / metrics["base_diversity"]
    return metrics


def _draftp_grid(demo: Demo, samples: dict[str, torch.Tensor], captions: list[str]) -> None:
    """Rows base / DRaFT / DRaFT+ for the first grid_prompts captions: draftp_grid.png."""
    n = demo.settings.draftp.grid_prompts
    rows = [samples[name][i] for i in range(n) for name in ("base", "draft", "draftp")]
    labels = [f"{name}: {captions[i]}" for i in range(n) for name in ("base", "DRaFT", "DRaFT+")]
    save_grid(torch.stack(rows), demo.path("draftp_grid.png"), labels=labels)


def _draftp_curves(run: Path) -> dict[str, list[float]]:
    rows = read_jsonl(run / "metrics.jsonl")
    return {
        "step": [r["step"] for r in rows if "reward" in r],
        "reward": [r["reward"] for r in rows if "reward" in r],
        "regularizer": [r["regularizer"] for r in rows if "regularizer" in r],
    }


# --- the table --------------------------------------------------------------------------------

EVALUATED = ("evaluation",)  # a model stage's results depend on how it is evaluated
STAGES = [
    Stage("data", _data, (), settings=("data",)),
    Stage("tokenizer", _tokenizer, ("data",), settings=("tokenizer",)),
    Stage("base", _base, ("tokenizer",), configs=("base",), settings=EVALUATED, is_model=True),
    Stage("sft", _sft, ("base",), configs=("sft",), settings=EVALUATED, is_model=True),
    Stage("dpo", _dpo, ("sft",), configs=("dpo",), settings=EVALUATED, is_model=True),
    Stage(
        "reward_model", _reward_model, ("sft",), configs=("reward_model",), settings=("reward_model",), in_summary=True
    ),
    Stage("attribute_model", _attribute_model, ("sft",), configs=("attribute_model",), in_summary=True),
    Stage(
        "rejection_sampling",
        _rejection_sampling,
        ("sft", "reward_model"),
        configs=("rejection_sampling",),
        settings=EVALUATED,
        is_model=True,
    ),
    Stage(
        "steerlm",
        _steerlm,
        ("sft", "attribute_model"),
        configs=("steerlm",),
        settings=(*EVALUATED, "steering"),
        is_model=True,
    ),
    Stage(
        "steerlm2",
        _steerlm2,
        ("sft", "steerlm"),
        configs=("steerlm2",),
        settings=(*EVALUATED, "steering"),
        is_model=True,
    ),
    Stage("ppo", _ppo, ("sft", "reward_model"), configs=("ppo",), settings=EVALUATED, is_model=True),
    Stage("ppo_ray", _ppo_ray, ("sft", "reward_model"), configs=("ppo",), settings=EVALUATED, is_model=True),
    Stage("grpo", _grpo, ("sft",), configs=("grpo",), settings=EVALUATED, is_model=True),
    Stage("grpo_vllm", _grpo_vllm, ("sft",), configs=("grpo",), settings=EVALUATED, is_model=True),
    Stage(
        "cai",
        cai_stage,
        ("data", "sft"),
        configs=("cai_helpful", "cai_feedback", "cai"),
        settings=(*EVALUATED, "cai"),
        in_summary=True,
    ),
    Stage(
        "rl_variants",
        rl_variants_stage,
        ("data", "sft"),
        configs=("grpo",),
        settings=(*EVALUATED, "rl_variants"),
        in_summary=True,
    ),
    Stage(
        "onpolicy_distill",
        onpolicy_distill_stage,
        ("data", "base", "sft"),
        configs=("onpolicy_distill", "onpolicy_distill_offline"),
        settings=(*EVALUATED, "onpolicy_distill"),
        in_summary=True,
    ),
    Stage("shapes", _shapes, (), settings=("draftp",)),
    Stage("draftp", _draftp, ("shapes",), configs=("draftp",), settings=("draftp",), in_summary=True),
]
DEFAULT_STAGES = ["data", "tokenizer", "base", "sft", "dpo", "reward_model"]


def run_demo(
    stage_names: list[str] | None = None, output_dir: str | Path = "runs/demo", settings: str | Path | None = None
) -> dict[str, Any]:
    """Run (or reuse) the requested stages (None: DEFAULT_STAGES; ["all"]: every stage) and their
    dependencies with the settings file (default configs/demo.yaml); write the report."""
    config = load_config(DemoConfig, settings or configs_dir() / "demo.yaml")
    return run_pipeline(STAGES, stage_names, output_dir, config, DEMO_VERSION, DEFAULT_STAGES)
