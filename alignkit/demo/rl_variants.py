"""Demo stages `rl_variants` and `onpolicy_distill`.

`rl_variants`: GRPO and its successors from the same SFT model against the same verifiable reward
(the oracle's check of the final answer), each run to the same budget of generated tokens, so a
method that samples more per step (DAPO's dynamic sampling) gets fewer steps, not more compute.
Per method: held-out correctness (paired with SFT on the same prompts), KL to SFT, the share of
zero-variance groups seen in training, and generated tokens per group that carried signal.

`onpolicy_distill`: the same student distilled from the same teacher on the same prompts, offline
(the `distill` recipe on the teacher's own answers) and on-policy (`reinforce.estimator=
onpolicy_distill`, on the student's samples); the student's oracle reward and its KL to the
teacher, with 95% CIs.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from alignkit.config import Section
from alignkit.demo.common import Demo, evaluate, read_jsonl, train
from alignkit.evaluation.evaluate import evaluate_model
from alignkit.evaluation.stats import mean_with_ci

__all__ = [
    "METHODS",
    "OnPolicyDistillSettings",
    "RLVariantsSettings",
    "onpolicy_distill_stage",
    "report_lines",
    "rl_variants_stage",
]


class RLVariantsSettings(Section):
    generated_tokens: int = Field(320_000, ge=1)  # each method's budget of generated response tokens
    max_steps: int = Field(200, ge=1)  # and at most this many steps (the budget comes first)


class OnPolicyDistillSettings(Section):
    steps: int = Field(60, ge=1)  # optimizer steps of each half (16 sequences each)
    eval_prompts: int = Field(700, ge=1)  # held-out prompts the two students are compared on


# overrides of configs/demo/grpo.yaml per method (the options of the one `reinforce` algorithm box)
METHODS: dict[str, list[str]] = {
    "grpo": [],
    "dapo": [
        "reinforce.max_draws=4",
        "reinforce.clip_eps_high=0.28",
        "reinforce.train_unended=false",
        "reinforce.overlong_buffer=16",
    ],
    "gspo": [
        "reinforce.policy_loss=gspo",
        "reinforce.loss_aggregation=seq-mean-token-mean",
        "reinforce.clip_eps=3e-4",
        "reinforce.clip_eps_high=4e-4",
    ],
    "cispo": ["reinforce.policy_loss=cispo", "reinforce.clip_eps_high=0.28"],
    "reinforce_pp_baseline": ["reinforce.estimator=reinforce_pp_baseline"],
}


def rl_variants_stage(demo: Demo) -> dict[str, Any]:
    settings = demo.settings.rl_variants
    common = [
        f"model.path={demo.path('sft', 'final')}",
        f"data.train.path={demo.path('data', 'prompts.jsonl')}",
        f"reinforce.steps={settings.max_steps}",
        f"reinforce.max_generated_tokens={settings.generated_tokens}",
    ]
    out: dict[str, Any] = {}
    for name, overrides in METHODS.items():
        stage = f"rl_variants/{name}"
        train(demo, stage, [*common, *overrides], config="grpo")
        metrics = evaluate(demo, stage, reference="sft")
        rows = read_jsonl(demo.path(stage, "metrics.jsonl"))
        out[name] = {
            "correctness": metrics["correctness"],
            "correctness_ci_low": metrics["correctness_ci_low"],
            "correctness_ci_high": metrics["correctness_ci_high"],
            **{k: v for k, v in metrics.items() if k.startswith("correctness_gain_vs_sft")},
            "kl": metrics["kl"],
            "reward": metrics["reward"],
            "steps": rows[-1]["step"],
            "generated_tokens": rows[-1]["rollout/generated_tokens_total"],
            "zero_variance_group_share": _mean(rows, "rollout/zero_variance_groups"),
            "groups_discarded": sum(r.get("rollout/groups_discarded", 0.0) for r in rows),
            "tokens_per_useful_group": _mean(rows, "rollout/tokens_per_useful_group"),
        }
    return out


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return sum(values) / max(len(values), 1)


def onpolicy_distill_stage(demo: Demo) -> dict[str, Any]:
    """Student: the base model; teacher: the SFT model. Offline: `distill` on the SFT data's
    prompts answered by the teacher; on-policy: the student's own samples, scored by the teacher."""
    settings = demo.settings.onpolicy_distill
    student, teacher = demo.path("base", "final"), demo.path("sft", "final")
    train(
        demo,
        "onpolicy_distill/offline",
        [
            f"model.path={student}",
            f"teacher.path={teacher}",
            f"data.train.path={demo.path('data', 'sft.jsonl')}",
            f"train.max_steps={settings.steps}",
        ],
        config="onpolicy_distill_offline",
    )
    train(
        demo,
        "onpolicy_distill/onpolicy",
        [
            f"model.path={student}",
            f"teacher.path={teacher}",
            f"data.train.path={demo.path('data', 'prompts.jsonl')}",
            f"reinforce.steps={settings.steps}",
        ],
        config="onpolicy_distill",
    )
    prompts = demo.eval_prompts()[: settings.eval_prompts]
    out: dict[str, Any] = {}
    for name in ("offline", "onpolicy"):
        result = evaluate_model(
            demo.path("onpolicy_distill", name, "final"),
            prompts,
            demo.settings.evaluation.sampling,
            reference_dir=teacher,
            reference_name="teacher",
        )
        keep = ("reward", "reward_ci_low", "reward_ci_high", "kl", "kl_ci_low", "kl_ci_high")
        out[name] = {k: result.metrics[k] for k in keep if k in result.metrics}
        out[name]["rewards"] = result.rewards
    paired = [a - b for a, b in zip(out["onpolicy"].pop("rewards"), out["offline"].pop("rewards"))]
    out.update(mean_with_ci("reward_gain_onpolicy_vs_offline", paired))
    (demo.path("onpolicy_distill", "summary.json")).write_text(json.dumps(out, indent=2))
    return out


def report_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """The report's sections for the two stages (when they ran)."""
    lines: list[str] = []
    if "rl_variants" in results:
        lines += [
            "## GRPO and its successors (stage rl_variants)",
            "",
            "Same SFT start, the answer check as reward, one budget of generated tokens each.",
            "",
            "| method | correctness (95% CI) | paired gain vs SFT | KL to SFT | zero-variance groups "
            "| tokens per useful group | steps |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, m in results["rl_variants"].items():
            if not isinstance(m, dict) or "correctness" not in m:
                continue
            gain = m.get("correctness_gain_vs_sft")
            gain_text = (
                f"{gain:+.3f} [{m['correctness_gain_vs_sft_ci_low']:+.3f}, {m['correctness_gain_vs_sft_ci_high']:+.3f}]"
                if gain is not None
                else "-"
            )
            lines.append(
                f"| {name} | {m['correctness']:.3f} [{m['correctness_ci_low']:.3f}, {m['correctness_ci_high']:.3f}] "
                f"| {gain_text} | {m['kl']:.2f} | {m['zero_variance_group_share']:.2f} "
                f"| {m['tokens_per_useful_group']:.0f} | {m['steps']} |"
            )
        lines.append("")
    if "onpolicy_distill" in results:
        r = results["onpolicy_distill"]
        lines += ["## On-policy vs offline distillation (stage onpolicy_distill)", ""]
        for name in ("offline", "onpolicy"):
            m = r[name]
            lines.append(
                f"- {name}: oracle reward {m['reward']:.3f} [{m['reward_ci_low']:.3f}, {m['reward_ci_high']:.3f}], "
                f"KL to the teacher {m['kl']:.2f} [{m['kl_ci_low']:.2f}, {m['kl_ci_high']:.2f}]"
            )
        key = "reward_gain_onpolicy_vs_offline"
        lines += [
            f"- on-policy - offline, paired: {r[key]:+.3f} [{r[key + '_ci_low']:+.3f}, {r[key + '_ci_high']:+.3f}]",
            "",
        ]
    return lines
