"""The end-to-end demo: the task world, a home-grown base model, and each alignment stage.

    alignkit demo [--stages data,tokenizer,base,sft|all] [--output-dir runs/demo]

Stages run in order, each in its own folder under the output directory. A stage records a
fingerprint of its inputs (its config, its code version and its upstream stages'
fingerprints) in `stage.json`; when the fingerprint is unchanged the stage is reused instead of
recomputed. Model stages are evaluated on the same held-out prompts with the same sampling, so
win rates compare responses to identical prompts. The demo ends with a table, `report.md`,
plots, and `summary.json` mapping each model stage to its metrics.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.config import find_config, load_config
from alignkit.data.io import write_jsonl
from alignkit.evaluation.evaluate import evaluate_model, plot_results, write_json
from alignkit.evaluation.stats import mean_with_ci, win_rate
from alignkit.config import SamplingConfig
from alignkit.recipes import recipe_module
from alignkit.tasks.datasets import STEERABLE_ATTRIBUTES, DatasetSizes
from alignkit.training.logging import get_logger

__all__ = ["DEFAULT_STAGES", "STAGES", "run_demo"]

# Bump when a change to the code behind the stages should invalidate cached results.
DEMO_VERSION = 2
EVAL_SAMPLING = SamplingConfig(max_new_tokens=96, temperature=0.7, seed=0)
DPO_ROUNDS = 2  # iterative DPO: each round samples fresh pairs from the previous round's model
DPO_SAMPLES = 4  # answers per training prompt for the on-policy DPO pairs
DPO_SAMPLING = SamplingConfig(max_new_tokens=96, temperature=1.0, seed=0)
# SteerLM: who labels the training responses ("oracle": clean labels, as HelpSteer's human
# ratings are; "attribute_model": the demo's regression reward model), what every steering
# request asks for besides the steered attribute, and what "the best answer" asks for.
STEER_ANNOTATOR = "oracle"
STEER_BASE = {"helpfulness": 4, "correctness": 4, "coherence": 4, "harmlessness": 4}
BEST_TARGETS = {**STEER_BASE, "verbosity": 1, "politeness": 4}
RM_SAMPLES = 4  # answers per training prompt whose oracle comparisons join the reward model's data
RM_SAMPLING = SamplingConfig(max_new_tokens=96, temperature=1.0, seed=100)
STEER_EVAL_PROMPTS = 140  # held-out prompts (20 per skill) x 5 levels x each steerable attribute
STEERLM2_PROMPTS = 1000


@dataclass
class Demo:
    root: Path
    fingerprints: dict[str, str]
    results: dict[str, dict[str, Any]]

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def eval_prompts(self) -> list[dict[str, Any]]:
        lines = self.path("data", "eval_prompts.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


# --- stages ----------------------------------------------------------------------------------


def _data(demo: Demo) -> dict[str, Any]:
    from alignkit.tasks import build_datasets

    paths = build_datasets(demo.path("data"), seed=0)
    return {"files": {name: str(p) for name, p in paths.items()}}


def _tokenizer(demo: Demo) -> dict[str, Any]:
    from alignkit.models.tokenizer import train_bpe_tokenizer

    texts = [json.loads(line)["text"] for line in demo.path("data", "pretrain.jsonl").read_text().splitlines()]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=2048)
    tokenizer.save_pretrained(demo.path("tokenizer"))
    return {"vocab_size": len(tokenizer)}


def _train(demo: Demo, stage: str, overrides: list[str], config: str | None = None, output: Path | None = None) -> None:
    """Run the recipe named in configs/demo/CONFIG.yaml (default: the stage's name) in this process."""
    path = find_config("demo", config or stage)
    recipe = load_config_recipe(path)
    module = recipe_module(recipe)
    cfg = load_config(module.Config, path,
                      [f"output_dir={output or demo.path(stage)}", "logging.progress=lines", *overrides])
    module.main(cfg)


def load_config_recipe(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["recipe"]


def _evaluate(demo: Demo, stage: str, reference: str | None = None,
              attributes: dict[str, int] | None = None) -> dict[str, Any]:
    prompts = demo.eval_prompts()
    reference_rewards = None
    if reference is not None:
        reference_rewards = json.loads(demo.path(reference, "eval.json").read_text())["rewards"]
    result = evaluate_model(
        demo.path(stage, "final"), prompts, EVAL_SAMPLING,
        reference_dir=demo.path(reference, "final") if reference else None,
        reference_name=reference or "reference", reference_rewards=reference_rewards, attributes=attributes,
    )
    write_json({**result.to_json(prompts), "rewards": result.rewards}, demo.path(stage, "eval.json"))
    if reference is not None:  # paired on the same prompts: far tighter than comparing two means' CIs
        reference_items = json.loads(demo.path(reference, "eval.json").read_text())["items"]
        result.metrics.update(mean_with_ci(f"reward_gain_vs_{reference}",
                                           [a - b for a, b in zip(result.rewards, reference_rewards)]))
        result.metrics.update(mean_with_ci(f"correctness_gain_vs_{reference}", [
            float(a["correctness"] == 4) - float(b["correctness"] == 4)
            for a, b in zip(result.scores, reference_items)]))
    return result.metrics


def _base(demo: Demo) -> dict[str, Any]:
    _train(demo, "base", [f"model.tokenizer_path={demo.path('tokenizer')}",
                          f"data.train.path={demo.path('data', 'pretrain.jsonl')}"])
    return _evaluate(demo, "base")


def _sft(demo: Demo) -> dict[str, Any]:
    _train(demo, "sft", [f"model.path={demo.path('base', 'final')}",
                         f"data.train.path={demo.path('data', 'sft.jsonl')}",
                         f"data.validation.path={demo.path('data', 'sft_valid.jsonl')}"])
    return _evaluate(demo, "sft", reference="base")


def _dpo(demo: Demo) -> dict[str, Any]:
    """Iterative on-policy DPO: each round, the current model answers the training prompts, the
    oracle judges the answers into pairs, and DPO trains from (and against) the current model."""
    from alignkit.evaluation.evaluate import sampled_preference_pairs

    prompts = [json.loads(line) for line in demo.path("data", "prompts.jsonl").read_text().splitlines()]
    model = demo.path("sft", "final")
    counts = []
    for round_ in range(1, DPO_ROUNDS + 1):
        out = demo.path("dpo") if round_ == DPO_ROUNDS else demo.path("dpo", f"round_{round_}")
        out.mkdir(parents=True, exist_ok=True)
        sampling = DPO_SAMPLING.model_copy(update={"seed": DPO_SAMPLING.seed + round_})
        pairs = sampled_preference_pairs(model, prompts, samples=DPO_SAMPLES, params=sampling)
        write_jsonl(pairs, out / "pairs.jsonl")
        counts.append(len(pairs))
        get_logger().info(f"demo: DPO round {round_}: {len(pairs)} on-policy pairs from {len(prompts)} prompts "
                          f"x {DPO_SAMPLES} answers of {model}")
        _train(demo, "dpo", [f"model.path={model}", f"data.train.path={out / 'pairs.jsonl'}",
                             f"data.validation.path={demo.path('data', 'prefs_valid.jsonl')}"], output=out)
        model = out / "final"
    metrics = _evaluate(demo, "dpo", reference="sft")
    metrics["pairs_per_round"] = counts
    return metrics


def _reward_model(demo: Demo) -> dict[str, Any]:
    """A Bradley-Terry model and an attribute model (Pearson r of each predicted attribute with the
    oracle's, on held-out responses).

    The Bradley-Terry model learns from the demonstrator's oracle-judged pairs plus comparisons of
    the SFT model's own answers (RM_SAMPLES per training prompt, every pair the oracle separates,
    as InstructGPT collects comparisons of its SFT model's outputs): rejection sampling and PPO rank
    the SFT model's answers, which the demonstrator's pairs alone rank worse (on-policy pairwise
    accuracy 0.72 without them, 0.89 with). Reported: pairwise accuracy on the demonstrator's
    held-out pairs and on the SFT model's answers to held-out (`valid`) prompts."""
    from alignkit.evaluation.evaluate import sampled_preference_pairs
    from alignkit.rewards.local import LocalRewardModel

    sft = demo.path("sft", "final")
    train_prompts = [json.loads(line) for line in demo.path("data", "prompts.jsonl").read_text().splitlines()]
    valid_prompts = [{"prompt": json.loads(line)["prompt"]}
                     for line in demo.path("data", "prefs_valid.jsonl").read_text().splitlines()]
    out = demo.path("reward_model")
    out.mkdir(parents=True, exist_ok=True)
    onpolicy = sampled_preference_pairs(sft, train_prompts, RM_SAMPLES, RM_SAMPLING, all_pairs=True)
    held_out = sampled_preference_pairs(sft, valid_prompts, RM_SAMPLES,
                                        RM_SAMPLING.model_copy(update={"seed": RM_SAMPLING.seed + 1}),
                                        all_pairs=True)
    demonstrator = [json.loads(line) for line in demo.path("data", "prefs.jsonl").read_text().splitlines()]
    write_jsonl(demonstrator + onpolicy, out / "bt_train.jsonl")
    write_jsonl(held_out, out / "onpolicy_valid.jsonl")
    get_logger().info(f"demo: reward model: {len(demonstrator)} demonstrator pairs + {len(onpolicy)} comparisons "
                      f"of the SFT model's answers ({RM_SAMPLES} per prompt); {len(held_out)} held-out comparisons")
    _train(demo, "reward_model", [f"model.path={sft}", f"data.train.path={out / 'bt_train.jsonl'}",
                                  f"data.validation.path={demo.path('data', 'prefs_valid.jsonl')}"],
           output=out / "bt")
    _train(demo, "reward_model", [f"model.path={sft}", f"data.train.path={demo.path('data', 'attributes.jsonl')}",
                                  f"data.validation.path={demo.path('data', 'attributes_valid.jsonl')}"],
           config="attribute_model", output=out / "attributes")
    bt = json.loads((out / "bt" / "eval.json").read_text())
    attributes = json.loads((out / "attributes" / "eval.json").read_text())
    correct = round(bt["pairwise_accuracy"] * bt["pairs"])
    metrics = mean_with_ci("pairwise_accuracy", [1.0] * correct + [0.0] * (bt["pairs"] - correct))
    metrics["pairs"] = bt["pairs"]
    rm = LocalRewardModel(out / "bt" / "final", batch_size=64)
    chosen = rm.score([r["prompt"] for r in held_out], [r["chosen"] for r in held_out]).rewards
    rejected = rm.score([r["prompt"] for r in held_out], [r["rejected"] for r in held_out]).rewards
    metrics.update(mean_with_ci("onpolicy_pairwise_accuracy", (chosen > rejected).float().tolist()))
    metrics.update({"onpolicy_pairs": len(held_out), "train_pairs_demonstrator": len(demonstrator),
                    "train_pairs_onpolicy": len(onpolicy)})
    metrics.update({k: v for k, v in attributes.items() if k.startswith(("pearson/", "mae/"))})
    return metrics


def _rejection_sampling(demo: Demo) -> dict[str, Any]:
    """Best-of-4 by the stage `reward_model`'s Bradley-Terry model (the oracle only evaluates)."""
    _train(demo, "rejection_sampling", [f"model.path={demo.path('sft', 'final')}",
                                        f"data.train.path={demo.path('data', 'prompts.jsonl')}",
                                        f"reward.path={demo.path('reward_model', 'bt', 'final')}"])
    return _evaluate(demo, "rejection_sampling", reference="sft")


def _steer_metrics(demo: Demo, stage: str) -> dict[str, Any]:
    """Oracle reward when asked for the best attributes, and attribute control: for each steerable
    attribute and each level 0..4, greedy answers to STEER_EVAL_PROMPTS held-out prompts, measured
    by the oracle (the SFT model, shown the same labels, is the baseline that ignores them)."""
    from alignkit.data.steerlm import SteerLMFormat
    from alignkit.evaluation.steering import attribute_control

    metrics = _evaluate(demo, stage, reference="sft", attributes=BEST_TARGETS)
    metrics["asked"] = BEST_TARGETS
    prompts = demo.eval_prompts()[:: len(demo.eval_prompts()) // STEER_EVAL_PROMPTS][:STEER_EVAL_PROMPTS]
    model = demo.path(stage, "final")
    metrics.update(attribute_control(model, prompts, list(STEERABLE_ATTRIBUTES), STEER_BASE))
    if stage == "steerlm":
        fmt = SteerLMFormat.from_config(_config(model))
        sft = attribute_control(demo.path("sft", "final"), prompts, list(STEERABLE_ATTRIBUTES), STEER_BASE, steer=fmt)
        metrics.update({f"sft_{k}": v for k, v in sft.items()})
    return metrics


def _config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def _steerlm(demo: Demo) -> dict[str, Any]:
    """Attribute-conditioned SFT from the SFT model on mixed-quality and good responses, each
    labelled by STEER_ANNOTATOR; then asked for the best attributes, and steered."""
    lines = [json.loads(line) for name in ("attributes.jsonl", "sft.jsonl")
             for line in demo.path("data", name).read_text().splitlines()]
    demo.path("steerlm").mkdir(parents=True, exist_ok=True)
    write_jsonl([{"prompt": r["prompt"], "response": r["response"]} for r in lines],
                demo.path("steerlm", "responses.jsonl"))
    annotator = (["annotate.kind=oracle"] if STEER_ANNOTATOR == "oracle" else
                 [f"annotate.path={demo.path('reward_model', 'attributes', 'final')}"])
    _train(demo, "steerlm", [f"model.path={demo.path('sft', 'final')}",
                             f"data.train.path={demo.path('steerlm', 'responses.jsonl')}", *annotator])
    return _steer_metrics(demo, "steerlm")


def _steerlm2(demo: Demo) -> dict[str, Any]:
    """SteerLM 2.0 from the SteerLM model on random (verbosity, politeness) targets, the other
    attributes at their best; log P(a|x,y) from the oracle's measurement of correctness and the steered
    attributes (configs/demo/steerlm2.yaml), log P(y|x) from the SFT model; 3 iterations."""
    from alignkit.tasks.datasets import steer_prompt_records

    demo.path("steerlm2").mkdir(parents=True, exist_ok=True)
    targets = [{**r, "attributes": {**STEER_BASE, **r["attributes"]}}
               for r in steer_prompt_records(STEERLM2_PROMPTS, seed=0)]
    write_jsonl(targets, demo.path("steerlm2", "targets.jsonl"))
    _train(demo, "steerlm2", [f"model.path={demo.path('steerlm', 'final')}",
                              f"data.train.path={demo.path('steerlm2', 'targets.jsonl')}",
                              f"steerlm2.prior_path={demo.path('sft', 'final')}"])
    return _steer_metrics(demo, "steerlm2")


def _rl_curves(stage: str, demo: Demo) -> dict[str, list[float]]:
    """Per logged step: the trained-on reward, the oracle's (monitor) reward and the KL, from metrics.jsonl."""
    rows = [json.loads(line) for line in demo.path(stage, "metrics.jsonl").read_text().splitlines()]
    keys = {"step": "step", "reward": "rollout/reward", "oracle": "rollout/monitor_reward", "kl": "rollout/kl"}
    return {name: [r[key] for r in rows if key in r] for name, key in keys.items()}


def _reward_hacking(demo: Demo, stage: str) -> dict[str, Any]:
    """Where the reward model and the oracle disagree: both score the held-out answers of SFT and of
    `stage`; per skill, the change of each. A skill whose reward-model score rose while the oracle's
    reward fell is reward hacking."""
    from alignkit.rewards.local import LocalRewardModel

    rm = LocalRewardModel(demo.path("reward_model", "bt", "final"), normalize=True)
    by_task: dict[str, dict[str, float]] = {}
    for model in ("sft", stage):
        items = json.loads(demo.path(model, "eval.json").read_text())["items"]
        scores = rm.score([i["prompt"] for i in items], [i["response"] for i in items]).rewards.tolist()
        for item, score in zip(items, scores):
            t = by_task.setdefault(item["task"], {})
            for key, value in ((f"{model}_rm", score), (f"{model}_oracle", item["reward"]), (f"{model}_n", 1.0)):
                t[key] = t.get(key, 0.0) + value
    table = {task: {"rm_change": t[f"{stage}_rm"] / t[f"{stage}_n"] - t["sft_rm"] / t["sft_n"],
                    "oracle_change": t[f"{stage}_oracle"] / t[f"{stage}_n"] - t["sft_oracle"] / t["sft_n"]}
             for task, t in sorted(by_task.items())}
    total = {k: sum(v[k] for v in table.values()) / len(table) for k in ("rm_change", "oracle_change")}
    hacked = [task for task, v in table.items() if v["rm_change"] > 0.05 and v["oracle_change"] < -0.01]
    return {"rm_change": total["rm_change"], "oracle_change": total["oracle_change"], "by_skill": table,
            "reward_hacked_skills": hacked}


def _ppo(demo: Demo) -> dict[str, Any]:
    """PPO from the SFT model against the stage `reward_model`'s Bradley-Terry model (the oracle
    monitors the rollouts and judges the result); the critic starts from the reward model."""
    _train(demo, "ppo", [f"model.path={demo.path('sft', 'final')}",
                         f"data.train.path={demo.path('data', 'prompts.jsonl')}",
                         f"reward.path={demo.path('reward_model', 'bt', 'final')}"])
    metrics = _evaluate(demo, "ppo", reference="sft")
    metrics.update(_reward_hacking(demo, "ppo"))
    metrics["curves"] = _rl_curves("ppo", demo)
    return metrics


def _grpo(demo: Demo) -> dict[str, Any]:
    """GRPO from the SFT model against the oracle's check of the final answer (a verifiable reward)."""
    _train(demo, "grpo", [f"model.path={demo.path('sft', 'final')}",
                          f"data.train.path={demo.path('data', 'prompts.jsonl')}"])
    metrics = _evaluate(demo, "grpo", reference="sft")
    metrics["curves"] = _rl_curves("grpo", demo)
    return metrics


# DRaFT+ on the shape world: UNet pretraining steps; evaluation on all 90 captions x 4 seeds (the
# seeds are not the training ones); the grid shows the first 6 captions.
DRAFTP_PRETRAIN_STEPS = 1500
DRAFTP_EVAL_SEEDS = (900, 901, 902, 903)
DRAFTP_GRID_PROMPTS = 6


def _shapes(demo: Demo) -> dict[str, Any]:
    """The shape world for DRaFT+: a judge (the differentiable reward) and a pretrained base pipeline."""
    from alignkit.diffusion.pipeline import save_pipeline
    from alignkit.diffusion.pretrain import pretrain_shape_pipeline
    from alignkit.diffusion.reward import train_shape_judge

    judge, judge_report = train_shape_judge(n=3000)
    judge.save(demo.path("shapes", "judge"))
    pipe, pretrain_report = pretrain_shape_pipeline(unet_steps=DRAFTP_PRETRAIN_STEPS, log=get_logger().info)
    save_pipeline(pipe, demo.path("shapes", "base"))
    return {"judge": judge_report, "pretrain": pretrain_report}


def _draftp(demo: Demo) -> dict[str, Any]:
    """DRaFT+ and plain DRaFT (kl_coeff 0) from the shape world's pretrained base pipeline, with the
    judge's differentiable reward; base, DRaFT and DRaFT+ sampled from the same prompts and seeds."""
    from alignkit.diffusion.images import save_grid
    from alignkit.diffusion.inference import generate_images, load_for_images
    from alignkit.diffusion.reward import ShapeJudge
    from alignkit.diffusion.sampling import diversity_by_prompt
    from alignkit.diffusion.shapes import caption_records
    from alignkit.recipes.draftp import Config as DraftpRecipeConfig

    shapes = demo.path("shapes")
    runs = {"draftp": demo.path("draftp", "draftp_run"), "draft": demo.path("draftp", "draft_run")}
    common = [f"model.path={shapes / 'base'}", f"reward={shapes / 'judge'}"]
    _train(demo, "draftp", common, output=runs["draftp"])
    _train(demo, "draftp", [*common, "draftp.kl_coeff=0"], output=runs["draft"])

    cfg = load_config(DraftpRecipeConfig, find_config("demo", "draftp"), [f"output_dir={runs['draftp']}", *common])
    captions = [r["prompt"] for r in caption_records(90, seed=1)]
    judge = ShapeJudge.load(shapes / "judge")
    pipes = {name: load_for_images(None, run / "final") for name, run in runs.items()}
    samples = {}
    for name, pipe, schedule in (("base", pipes["draftp"], "base"), ("draft", pipes["draft"], "draft"),
                                 ("draftp", pipes["draftp"], "draft"), ("draftp_aig_linear", pipes["draftp"], "linear")):
        samples[name] = generate_images(pipe, captions, list(DRAFTP_EVAL_SEEDS), cfg.sampling.steps,
                                        cfg.sampling.guidance_scale, schedule)
    metrics: dict[str, Any] = {}
    per_caption: dict[str, list[float]] = {}
    for name, images in samples.items():
        with torch.no_grad():
            rewards = judge.reward(images.flatten(0, 1), [c for c in captions for _ in DRAFTP_EVAL_SEEDS])
        prefix = "" if name == "draftp" else f"{name}_"
        metrics.update(mean_with_ci(f"{prefix}reward", rewards.tolist()))
        # per caption, so that the interval is over captions
        per_caption[name] = diversity_by_prompt(images)
        metrics.update(mean_with_ci(f"{prefix}diversity", per_caption[name]))
        if name != "base":  # how far each image moved from the base model's for the same caption and seed
            distance = (images - samples["base"]).pow(2).flatten(2).mean(-1).sqrt()  # (P, S) RMS
            metrics.update(mean_with_ci(f"{prefix}distance_to_base", distance.flatten().tolist()))
    # paired over captions (same captions and seeds): far tighter than comparing the two intervals
    for name, reference in (("draftp", "draft"), ("draftp", "base"), ("draft", "base")):
        gain = [a - b for a, b in zip(per_caption[name], per_caption[reference])]
        metrics.update(mean_with_ci(f"{'' if name == 'draftp' else name + '_'}diversity_gain_vs_{reference}", gain))
    metrics["diversity_kept"] = metrics["diversity"] / metrics["base_diversity"]
    metrics["draft_diversity_kept"] = metrics["draft_diversity"] / metrics["base_diversity"]
    metrics["kl_coeff"] = cfg.draftp.kl_coeff
    rows = [samples[name][i] for i in range(DRAFTP_GRID_PROMPTS) for name in ("base", "draft", "draftp")]
    labels = [f"{name}: {captions[i]}" for i in range(DRAFTP_GRID_PROMPTS) for name in ("base", "DRaFT", "DRaFT+")]
    save_grid(torch.stack(rows), demo.path("draftp_grid.png"), labels=labels)
    curves = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
              for name, run in runs.items()}
    metrics["curves"] = {name: {"step": [r["step"] for r in rows if "reward" in r],
                                "reward": [r["reward"] for r in rows if "reward" in r],
                                "regularizer": [r["regularizer"] for r in rows if "regularizer" in r]}
                         for name, rows in curves.items()}
    metrics.update(demo.results["shapes"])  # the judge's accuracy, the pretraining report
    return metrics


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Demo], dict[str, Any]]
    needs: tuple[str, ...]
    configs: tuple[str, ...] = ()  # configs/demo/NAME.yaml, part of the fingerprint
    is_model: bool = False  # a generative model: evaluated on the held-out prompts, in the table
    in_summary: bool = False  # a stage that is not a generative model but reports metrics (reward models)
    settings: tuple = ()  # constants of the stage's code that its results depend on (fingerprinted)


STAGES = [
    Stage("data", _data, (), settings=(DatasetSizes(),)),
    Stage("tokenizer", _tokenizer, ("data",)),
    Stage("base", _base, ("tokenizer",), configs=("base",), is_model=True),
    Stage("sft", _sft, ("base",), configs=("sft",), is_model=True),
    Stage("dpo", _dpo, ("sft",), configs=("dpo",), is_model=True, settings=(DPO_ROUNDS, DPO_SAMPLES, DPO_SAMPLING)),
    Stage("reward_model", _reward_model, ("sft",), configs=("reward_model", "attribute_model"), in_summary=True,
          settings=(RM_SAMPLES, RM_SAMPLING)),
    Stage("rejection_sampling", _rejection_sampling, ("sft", "reward_model"), configs=("rejection_sampling",),
          is_model=True),
    Stage("steerlm", _steerlm, ("sft", "reward_model"), configs=("steerlm",), is_model=True,
          settings=(STEER_ANNOTATOR, STEER_BASE, BEST_TARGETS, STEER_EVAL_PROMPTS, STEERABLE_ATTRIBUTES)),
    Stage("steerlm2", _steerlm2, ("sft", "steerlm"), configs=("steerlm2",), is_model=True,
          settings=(STEERLM2_PROMPTS, STEER_BASE, BEST_TARGETS, STEER_EVAL_PROMPTS, STEERABLE_ATTRIBUTES)),
    Stage("ppo", _ppo, ("sft", "reward_model"), configs=("ppo",), is_model=True),
    Stage("grpo", _grpo, ("sft",), configs=("grpo",), is_model=True),
    Stage("shapes", _shapes, (), settings=(DRAFTP_PRETRAIN_STEPS,)),
    Stage("draftp", _draftp, ("shapes",), configs=("draftp",), in_summary=True,
          settings=(DRAFTP_EVAL_SEEDS, DRAFTP_GRID_PROMPTS)),
]
DEFAULT_STAGES = ["data", "tokenizer", "base", "sft", "dpo", "reward_model"]



# --- orchestration ---------------------------------------------------------------------------


def _fingerprint(stage: Stage, demo: Demo) -> str:
    parts = [stage.name, str(DEMO_VERSION), repr(EVAL_SAMPLING)]
    if stage.settings:
        parts.append(repr(stage.settings))
    parts += [find_config("demo", name).read_text() for name in stage.configs]
    parts += [demo.fingerprints[n] for n in stage.needs]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _saved_metrics(stage: Stage, demo: Demo) -> dict[str, Any] | None:
    """The stage's saved metrics if its results on disk are current (the same fingerprint: config,
    demo version, upstream stages), else None; a current stage is recorded in `demo`."""
    fingerprint = _fingerprint(stage, demo)
    marker = demo.path(stage.name, "stage.json")
    if not marker.is_file():
        return None
    saved = json.loads(marker.read_text())
    if saved.get("fingerprint") != fingerprint:
        return None
    demo.fingerprints[stage.name] = fingerprint
    demo.results[stage.name] = saved["metrics"]
    return saved["metrics"]


def _run_stage(stage: Stage, demo: Demo, log) -> None:
    if _saved_metrics(stage, demo) is not None:
        log.info(f"demo: stage {stage.name} is up to date, reusing {demo.path(stage.name)}")
        return
    log.info(f"demo: running stage {stage.name}")
    if demo.path(stage.name).exists():  # stale results (and checkpoints) must not be resumed from
        shutil.rmtree(demo.path(stage.name))
    fingerprint = _fingerprint(stage, demo)
    start = time.perf_counter()
    metrics = stage.run(demo)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    write_json({"fingerprint": fingerprint, "metrics": metrics}, demo.path(stage.name, "stage.json"))
    demo.fingerprints[stage.name] = fingerprint
    demo.results[stage.name] = metrics


def _current_extra_stages(demo: Demo, requested: list[Stage]) -> list[Stage]:
    """Stages not requested this time whose results from an earlier run are still current, so that
    `make demo` after `--stages all` keeps reporting them rather than dropping them from the summary
    (STAGES order: a stage's upstream is decided before it)."""
    names = {s.name for s in requested}
    return [s for s in STAGES if s.name not in names and all(n in demo.fingerprints for n in s.needs)
            and _saved_metrics(s, demo) is not None]


def _with_dependencies(names: list[str]) -> list[Stage]:
    by_name = {s.name: s for s in STAGES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown demo stage(s) {unknown}; stages: {', '.join(by_name)} or 'all'")
    wanted: set[str] = set()

    def add(name: str) -> None:
        wanted.add(name)
        for dep in by_name[name].needs:
            add(dep)

    for name in names:
        add(name)
    return [s for s in STAGES if s.name in wanted]


def _add_win_rates(demo: Demo, stages: list[Stage]) -> None:
    """Win rate of every later model stage against base and sft, from the stored per-prompt rewards."""
    rewards = {s.name: json.loads(demo.path(s.name, "eval.json").read_text())["rewards"]
               for s in stages if s.is_model}
    order = list(rewards)
    for name in rewards:
        for reference in ("base", "sft"):
            if reference in rewards and order.index(reference) < order.index(name):
                demo.results[name].update(mean_with_ci(f"win_rate_vs_{reference}",
                                                       win_rate(rewards[name], rewards[reference])))


def _table(demo: Demo, stages: list[Stage]) -> str:
    header = "| stage | reward (95% CI) | correctness | harmful rate | win rate vs base | KL to reference |\n|---|---|---|---|---|---|"
    rows = []
    for stage in stages:
        if not stage.is_model:
            continue
        m = demo.results[stage.name]
        win = f"{m['win_rate_vs_base']:.2f}" if "win_rate_vs_base" in m else "-"
        kl = f"{m['kl']:.2f}" if "kl" in m else "-"
        rows.append(f"| {stage.name} | {m['reward']:.3f} [{m['reward_ci_low']:.3f}, {m['reward_ci_high']:.3f}] | "
                    f"{m['correctness']:.3f} | {m['harmful_rate']:.3f} | {win} | {kl} |")
    return "\n".join([header, *rows])


def _reward_model_lines(demo: Demo, stages: list[Stage]) -> list[str]:
    if "reward_model" not in [s.name for s in stages]:
        return []
    m = demo.results["reward_model"]
    names = [k.removeprefix("pearson/") for k in m if k.startswith("pearson/")]
    return [
        f"Reward model (Bradley-Terry): pairwise accuracy {m['pairwise_accuracy']:.3f} "
        f"[{m['pairwise_accuracy_ci_low']:.3f}, {m['pairwise_accuracy_ci_high']:.3f}] on {m['pairs']} held-out "
        "demonstrator pairs; on the SFT model's own answers to held-out prompts (what rejection sampling and PPO "
        f"rank) {m['onpolicy_pairwise_accuracy']:.3f} [{m['onpolicy_pairwise_accuracy_ci_low']:.3f}, "
        f"{m['onpolicy_pairwise_accuracy_ci_high']:.3f}] on {m['onpolicy_pairs']} comparisons.",
        "",
        "Attribute model (regression), Pearson r with the oracle on held-out responses:",
        "",
        "| " + " | ".join(names) + " |",
        "|" + "---|" * len(names),
        "| " + " | ".join(f"{m[f'pearson/{n}']:.2f}" for n in names) + " |",
        "",
    ]


def _steering_lines(demo: Demo, stages: list[Stage]) -> list[str]:
    steered = [s.name for s in stages if s.name in ("steerlm", "steerlm2")]
    if not steered:
        return []
    names = list(STEERABLE_ATTRIBUTES)
    rows = []
    first = demo.results[steered[0]]
    if "sft_attribute_accuracy" in first:
        rows.append(("sft (ignores the label)", {k.removeprefix("sft_"): v for k, v in first.items()
                                                 if k.startswith("sft_")}))
    rows += [(name, demo.results[name]) for name in steered]
    asked = ", ".join(f"{k} {v}" for k, v in BEST_TARGETS.items())
    return [
        f"Attribute control (greedy answers to {STEER_EVAL_PROMPTS} held-out prompts x 5 requested levels, measured "
        "by the oracle; Spearman of requested vs measured level, and the share measured exactly as requested):",
        "",
        "| model | attribute accuracy | " + " | ".join(f"{n} Spearman | {n} by level 0..4" for n in names) + " |",
        "|---|---|" + "---|---|" * len(names),
        *[f"| {label} | {m['attribute_accuracy']:.3f} | " + " | ".join(
            f"{m[f'{n}_spearman']:.2f} | {' '.join(f'{x:.1f}' for x in m[f'{n}_by_level'])}" for n in names) + " |"
          for label, m in rows],
        "",
        f"The SteerLM rows of the main table ask for {asked}.",
        "",
    ]


def _rl_lines(demo: Demo, stages: list[Stage]) -> list[str]:
    """The RL stages' training curves (plotted) and the reward-model vs oracle comparison."""
    rl = [s.name for s in stages if s.name in ("ppo", "grpo")]
    if not rl:
        return []
    plot = _plot_curves({name: demo.results[name]["curves"] for name in rl}, demo.path("rl_curves.png"))
    lines = [f"RL training curves (rollout reward the stage trains on, the oracle's reward of the same rollouts, "
             f"KL to the SFT model per response): ![rl curves]({plot.name})", ""]
    for name in rl:
        m = demo.results[name]
        if "reward_gain_vs_sft" in m:
            lines += [f"{name} vs SFT on the same held-out prompts (paired, 95% CI): reward "
                      f"{m['reward_gain_vs_sft']:+.3f} [{m['reward_gain_vs_sft_ci_low']:+.3f}, "
                      f"{m['reward_gain_vs_sft_ci_high']:+.3f}], correctness {m['correctness_gain_vs_sft']:+.3f} "
                      f"[{m['correctness_gain_vs_sft_ci_low']:+.3f}, {m['correctness_gain_vs_sft_ci_high']:+.3f}], "
                      f"win rate {m['win_rate_vs_sft']:.3f}, KL to SFT {m['kl']:.2f}.", ""]
    if "ppo" in rl:
        m = demo.results["ppo"]
        lines += [f"PPO, reward model vs oracle on the held-out answers (change from SFT, mean over skills): "
                  f"reward model {m['rm_change']:+.3f} (standardised), oracle {m['oracle_change']:+.3f}.",
                  "", "| skill | reward-model change | oracle change |", "|---|---|---|",
                  *[f"| {task} | {v['rm_change']:+.3f} | {v['oracle_change']:+.3f} |" for task, v in m["by_skill"].items()],
                  "", "Reward hacking (reward model up, oracle down): " +
                  (", ".join(m["reward_hacked_skills"]) or "none seen") + "; where the reward model's gain most "
                  "exceeds the oracle's (it credits answers the oracle does not): " + ", ".join(
                      f"{task} ({v['rm_change'] - v['oracle_change']:+.3f})" for task, v in sorted(
                          m["by_skill"].items(), key=lambda kv: kv[1]["oracle_change"] - kv[1]["rm_change"])[:2]) +
                  ".", ""]
    return lines


def _draftp_lines(demo: Demo, stages: list[Stage]) -> list[str]:
    if "draftp" not in [s.name for s in stages]:
        return []
    m = demo.results["draftp"]
    def row(label: str, p: str) -> str:
        distance = f"{m[p + 'distance_to_base']:.3f}" if p + "distance_to_base" in m else "-"
        return (f"| {label} | {m[p + 'reward']:.3f} [{m[p + 'reward_ci_low']:.3f}, {m[p + 'reward_ci_high']:.3f}] | "
                f"{m[p + 'diversity']:.3f} [{m[p + 'diversity_ci_low']:.3f}, {m[p + 'diversity_ci_high']:.3f}] | "
                f"{m[p + 'diversity'] / m['base_diversity']:.2f} | {distance} |")

    return ["DRaFT+ on the shape world (text-to-image; the judge's reward: mean probability of the caption's "
            "shape, colour and background; diversity: mean pairwise RMS distance between one caption's images; "
            "distance to base: RMS distance to the base model's image for the same caption and seed; "
            f"90 captions x {len(DRAFTP_EVAL_SEEDS)} seeds):", "",
            "| model | reward (95% CI) | diversity (95% CI) | diversity / base | distance to base |",
            "|---|---|---|---|---|",
            row("base", "base_"), row("DRaFT (kl_coeff 0)", "draft_"), row(f"DRaFT+ (kl_coeff {m['kl_coeff']:g})", ""),
            row("DRaFT+ with AIG (linear)", "draftp_aig_linear_"), "",
            "Diversity change on the same captions and seeds (paired, 95% CI): DRaFT+ vs DRaFT "
            f"{m['diversity_gain_vs_draft']:+.3f} [{m['diversity_gain_vs_draft_ci_low']:+.3f}, "
            f"{m['diversity_gain_vs_draft_ci_high']:+.3f}], DRaFT+ vs base {m['diversity_gain_vs_base']:+.3f} "
            f"[{m['diversity_gain_vs_base_ci_low']:+.3f}, {m['diversity_gain_vs_base_ci_high']:+.3f}], DRaFT vs base "
            f"{m['draft_diversity_gain_vs_base']:+.3f} [{m['draft_diversity_gain_vs_base_ci_low']:+.3f}, "
            f"{m['draft_diversity_gain_vs_base_ci_high']:+.3f}].", "",
            "Same captions and seeds, rows base / DRaFT / DRaFT+: ![draftp grid](draftp_grid.png)", ""]


def _plot_curves(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        axes[0].plot(c["step"][: len(c["reward"])], c["reward"], label=f"{name}: trained-on reward")
        if c["oracle"]:
            axes[0].plot(c["step"][: len(c["oracle"])], c["oracle"], "--", label=f"{name}: oracle reward")
        if c["kl"]:
            axes[1].plot(c["step"][: len(c["kl"])], c["kl"], label=name)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("mean rollout reward")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("KL to SFT per response (nats)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(stage_names: list[str] | None = None, output_dir: str | Path = "runs/demo") -> dict[str, Any]:
    """Run (or reuse) the requested stages and their dependencies; write the report."""
    log = get_logger()
    names = [s.name for s in STAGES] if stage_names == ["all"] else (stage_names or DEFAULT_STAGES)
    stages = _with_dependencies(names)
    demo = Demo(root=Path(output_dir), fingerprints={}, results={})
    demo.root.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        _run_stage(stage, demo, log)
    extra = _current_extra_stages(demo, stages)
    if extra:
        log.info(f"demo: also reporting {', '.join(s.name for s in extra)} (current results of an earlier run)")
        stages = [s for s in STAGES if s in stages or s in extra]
    _add_win_rates(demo, stages)
    models = {s.name: demo.results[s.name] for s in stages if s.is_model}
    summary = {s.name: demo.results[s.name] for s in stages if s.is_model or s.in_summary}
    write_json(summary, demo.path("summary.json"))
    plot = plot_results(models, demo.path("reward.png"), "task-world oracle evaluation (held-out prompts)")
    table = _table(demo, stages)
    report = [
        "# alignkit demo report", "",
        f"Held-out prompts: {len(demo.eval_prompts())} (an equal number per skill), sampled at temperature "
        f"{EVAL_SAMPLING.temperature}, up to {EVAL_SAMPLING.max_new_tokens} tokens, scored by the task-world oracle.",
        "", table, "", f"![reward]({plot.name})", "", *_reward_model_lines(demo, stages),
        *_steering_lines(demo, stages), *_rl_lines(demo, stages), *_draftp_lines(demo, stages),
        "Stage timings (s): " + ", ".join(f"{s.name} {demo.results[s.name].get('seconds', 0):.0f}" for s in stages),
    ]
    demo.path("report.md").write_text("\n".join(report) + "\n")
    print(table)
    for line in [*_reward_model_lines(demo, stages), *_steering_lines(demo, stages), *_rl_lines(demo, stages),
                 *_draftp_lines(demo, stages)]:
        print(line)
    print(f"\nreport: {demo.path('report.md')}  summary: {demo.path('summary.json')}")
    return models
