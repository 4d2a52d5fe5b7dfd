"""The demo's report: the results table, the reward model, steering, RL and DRaFT+ sections, and
the plots, written to report.md (with reward.png, rl_curves.png) and printed to the console.

Each section is rendered once, for the file and the console alike; a section whose stages were
not run is empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.config import Section
from alignkit.demo.cai import report_lines as cai_lines
from alignkit.demo.rl_variants import report_lines as rl_variant_lines
from alignkit.evaluation.evaluate import plot_results
from alignkit.tasks.datasets import STEERABLE_ATTRIBUTES

__all__ = ["write_report"]

Results = dict[str, dict[str, Any]]  # {stage: metrics} of the stages shown, in table order


def write_report(root: Path, settings: Section, results: Results, models: list[str], eval_prompts: int) -> None:
    """root/report.md with the table of the `models` stages, reward.png and every section of the
    stages in `results`; the table and the sections on the console."""
    plot = plot_results(
        {name: results[name] for name in models}, root / "reward.png", "task-world oracle evaluation (held-out prompts)"
    )
    table = _table(results, models)
    sections = [
        *_reward_model_lines(results),
        *_steering_lines(results, settings.steering),
        *_rl_lines(results, root),
        *_draftp_lines(results, settings.draftp),
        *cai_lines(results),
        *rl_variant_lines(results),
    ]
    sampling = settings.evaluation.sampling
    report = [
        "# alignkit demo report",
        "",
        f"Held-out prompts: {eval_prompts} (an equal number per skill), sampled at temperature "
        f"{sampling.temperature}, up to {sampling.max_new_tokens} tokens, scored by the task-world oracle.",
        "",
        table,
        "",
        f"![reward]({plot.name})",
        "",
        *sections,
        "Stage timings (s): " + ", ".join(f"{name} {m.get('seconds', 0):.0f}" for name, m in results.items()),
    ]
    (root / "report.md").write_text("\n".join(report) + "\n")
    print(table)
    for line in sections:
        print(line)
    print(f"\nreport: {root / 'report.md'}  summary: {root / 'summary.json'}")


def _table(results: Results, models: list[str]) -> str:
    header = (
        "| stage | reward (95% CI) | correctness | harmful rate | win rate vs base | KL to reference |\n"
        "|---|---|---|---|---|---|"
    )
    rows = []
    for name in models:
        m = results[name]
        win = f"{m['win_rate_vs_base']:.2f}" if "win_rate_vs_base" in m else "-"
        kl = f"{m['kl']:.2f}" if "kl" in m else "-"
        rows.append(
            f"| {name} | {m['reward']:.3f} [{m['reward_ci_low']:.3f}, {m['reward_ci_high']:.3f}] | "
            f"{m['correctness']:.3f} | {m['harmful_rate']:.3f} | {win} | {kl} |"
        )
    return "\n".join([header, *rows])


def _reward_model_lines(results: Results) -> list[str]:
    lines = []
    if "reward_model" in results:
        m = results["reward_model"]
        lines += [
            f"Reward model (Bradley-Terry): pairwise accuracy {m['pairwise_accuracy']:.3f} "
            f"[{m['pairwise_accuracy_ci_low']:.3f}, {m['pairwise_accuracy_ci_high']:.3f}] on {m['pairs']} held-out "
            "demonstrator pairs; on the SFT model's own answers to held-out prompts (what rejection sampling and "
            f"PPO rank) {m['onpolicy_pairwise_accuracy']:.3f} [{m['onpolicy_pairwise_accuracy_ci_low']:.3f}, "
            f"{m['onpolicy_pairwise_accuracy_ci_high']:.3f}] on {m['onpolicy_pairs']} comparisons.",
            "",
        ]
    if "attribute_model" in results:
        m = results["attribute_model"]
        names = [k.removeprefix("pearson/") for k in m if k.startswith("pearson/")]
        lines += [
            "Attribute model (regression), Pearson r with the oracle on held-out responses:",
            "",
            "| " + " | ".join(names) + " |",
            "|" + "---|" * len(names),
            "| " + " | ".join(f"{m[f'pearson/{n}']:.2f}" for n in names) + " |",
            "",
        ]
    return lines


def _steering_lines(results: Results, steering: Section) -> list[str]:
    steered = [name for name in results if name in ("steerlm", "steerlm2")]
    if not steered:
        return []
    names = list(STEERABLE_ATTRIBUTES)
    rows = []
    first = results[steered[0]]
    if "sft_attribute_accuracy" in first:
        rows.append(
            ("sft (ignores the label)", {k.removeprefix("sft_"): v for k, v in first.items() if k.startswith("sft_")})
        )
    rows += [(name, results[name]) for name in steered]
    asked = ", ".join(f"{k} {v}" for k, v in steering.best_targets.items())
    return [
        f"Attribute control (greedy answers to {steering.eval_prompts} held-out prompts x 5 requested levels, measured "
        "by the oracle; Spearman of requested vs measured level, and the share measured exactly as requested):",
        "",
        "| model | attribute accuracy | " + " | ".join(f"{n} Spearman | {n} by level 0..4" for n in names) + " |",
        "|---|---|" + "---|---|" * len(names),
        *[
            f"| {label} | {m['attribute_accuracy']:.3f} | "
            + " | ".join(
                f"{m[f'{n}_spearman']:.2f} | {' '.join(f'{x:.1f}' for x in m[f'{n}_by_level'])}" for n in names
            )
            + " |"
            for label, m in rows
        ],
        "",
        f"The SteerLM rows of the main table ask for {asked}.",
        "",
    ]


def _rl_lines(results: Results, root: Path) -> list[str]:
    """The RL stages' training curves (plotted to root/rl_curves.png) and the reward-model vs oracle
    comparison."""
    rl = [name for name in results if name in ("ppo", "grpo")]
    if not rl:
        return []
    plot = _plot_curves({name: results[name]["curves"] for name in rl}, root / "rl_curves.png")
    lines = [
        f"RL training curves (rollout reward the stage trains on, the oracle's reward of the same rollouts, "
        f"KL to the SFT model per response): ![rl curves]({plot.name})",
        "",
    ]
    for name in rl:
        m = results[name]
        if "reward_gain_vs_sft" in m:
            lines += [
                f"{name} vs SFT on the same held-out prompts (paired, 95% CI): reward "
                f"{m['reward_gain_vs_sft']:+.3f} [{m['reward_gain_vs_sft_ci_low']:+.3f}, "
                f"{m['reward_gain_vs_sft_ci_high']:+.3f}], correctness {m['correctness_gain_vs_sft']:+.3f} "
                f"[{m['correctness_gain_vs_sft_ci_low']:+.3f}, {m['correctness_gain_vs_sft_ci_high']:+.3f}], "
                f"win rate {m['win_rate_vs_sft']:.3f}, KL to SFT {m['kl']:.2f}.",
                "",
            ]
    if "ppo" in rl:
        m = results["ppo"]
        lines += [
            f"PPO, reward model vs oracle on the held-out answers (change from SFT, mean over skills): "
            f"reward model {m['rm_change']:+.3f} (standardised), oracle {m['oracle_change']:+.3f}.",
            "",
            "| skill | reward-model change | oracle change |",
            "|---|---|---|",
            *[f"| {task} | {v['rm_change']:+.3f} | {v['oracle_change']:+.3f} |" for task, v in m["by_skill"].items()],
            "",
            "Reward hacking (reward model up, oracle down): "
            + (", ".join(m["reward_hacked_skills"]) or "none seen")
            + "; where the reward model's gain most "
            "exceeds the oracle's (it credits answers the oracle does not): "
            + ", ".join(
                f"{task} ({v['rm_change'] - v['oracle_change']:+.3f})"
                for task, v in sorted(
                    m["by_skill"].items(), key=lambda kv: kv[1]["oracle_change"] - kv[1]["rm_change"]
                )[:2]
            )
            + ".",
            "",
        ]
    return lines


def _draftp_lines(results: Results, draftp: Section) -> list[str]:
    if "draftp" not in results:
        return []
    m = results["draftp"]

    def row(label: str, p: str) -> str:
        distance = f"{m[p + 'distance_to_base']:.3f}" if p + "distance_to_base" in m else "-"
        return (
            f"| {label} | {m[p + 'reward']:.3f} [{m[p + 'reward_ci_low']:.3f}, {m[p + 'reward_ci_high']:.3f}] | "
            f"{m[p + 'diversity']:.3f} [{m[p + 'diversity_ci_low']:.3f}, {m[p + 'diversity_ci_high']:.3f}] | "
            f"{m[p + 'diversity'] / m['base_diversity']:.2f} | {distance} |"
        )

    return [
        "DRaFT+ on the shape world (text-to-image; the judge's reward: mean probability of the caption's "
        "shape, colour and background; diversity: mean pairwise RMS distance between one caption's images; "
        "distance to base: RMS distance to the base model's image for the same caption and seed; "
        f"90 captions x {len(draftp.eval_seeds)} seeds):",
        "",
        "| model | reward (95% CI) | diversity (95% CI) | diversity / base | distance to base |",
        "|---|---|---|---|---|",
        row("base", "base_"),
        row("DRaFT (kl_coeff 0)", "draft_"),
        row(f"DRaFT+ (kl_coeff {m['kl_coeff']:g})", ""),
        row("DRaFT+ with AIG (linear)", "draftp_aig_linear_"),
        "",
        "Diversity change on the same captions and seeds (paired, 95% CI): DRaFT+ vs DRaFT "
        f"{m['diversity_gain_vs_draft']:+.3f} [{m['diversity_gain_vs_draft_ci_low']:+.3f}, "
        f"{m['diversity_gain_vs_draft_ci_high']:+.3f}], DRaFT+ vs base {m['diversity_gain_vs_base']:+.3f} "
        f"[{m['diversity_gain_vs_base_ci_low']:+.3f}, {m['diversity_gain_vs_base_ci_high']:+.3f}], DRaFT vs base "
        f"{m['draft_diversity_gain_vs_base']:+.3f} [{m['draft_diversity_gain_vs_base_ci_low']:+.3f}, "
        f"{m['draft_diversity_gain_vs_base_ci_high']:+.3f}].",
        "",
        "Same captions and seeds, rows base / DRaFT / DRaFT+: ![draftp grid](draftp_grid.png)",
        "",
    ]


def _plot_curves(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    import matplotlib  # here, not at the top: matplotlib takes a second to import, the plot is optional

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
