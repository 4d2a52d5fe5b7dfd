"""What placing ranks and roles with Ray costs, and what one-step off-policy buys, on this machine.

    python benchmarks/ray_placement.py [--steps 8] [--repeats 2]

Runs, interleaved and repeated (the machine is shared and noisy: compare within a round):
  1. PPO on a random Llama the size of the demo's base (96 wide, 4 layers, 3 heads of 32, tied
     embeddings), 1 process: torchrun vs --launcher ray
     (the ranks placed by Ray): Ray's overhead as a ratio of the median step time
  2. GRPO with a generation actor of its own: on-policy vs rollout.overlap (one step off-policy):
     median step time and the reward curve
Step times are from metrics.jsonl (the sum of each step's `timing/` phases), the first step excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = (
    "model.random_init={architecture: llama, hidden_size: 96, num_layers: 4, num_heads: 3, num_kv_heads: 3, "
    "intermediate_size: 256, max_position_embeddings: 512, tie_word_embeddings: true}"
)
COMMON = [
    MODEL,
    "reward.kind=function",
    "reward.function=benchmarks.ray_placement:vowel_reward",
    "checkpoint.every=null",
    "checkpoint.save_final=false",
    "logging.progress=none",
    "logging.tensorboard=false",
]


def vowel_reward(prompts: list, responses: list[str]) -> list[float]:
    """A reward a random model can learn within a few steps: the share of vowels in the response."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def run(recipe: str, out: Path, *args: str) -> list[dict]:
    cmd = [sys.executable, "-m", "alignkit.cli", "run", recipe, "--config", "tiny", f"output_dir={out}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_time(metrics: list[dict]) -> float:
    """Median seconds per step after the first: the sum of its `timing/` phases (generation or the
    wait for it, scoring, log-probs, training, the wait for the draw ahead, the weight sync)."""
    steps = [sum(v for k, v in m.items() if k.startswith("timing/")) for m in metrics if "timing/train_s" in m]
    return statistics.median(steps[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ppo = [*COMMON, f"ppo.steps={args.steps}"]
    grpo = [*COMMON, "reinforce.estimator=grpo", f"reinforce.steps={args.steps}", "placement.generator.ranks=1"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows: dict[str, list[float]] = {}
        rewards: dict[str, list[float]] = {}
        for r in range(args.repeats):
            for name, recipe, extra in (
                ("ppo torchrun", "ppo", ppo),
                ("ppo ray", "ppo", [*ppo, "--launcher", "ray"]),
                ("grpo on-policy (generator actor)", "reinforce", [*grpo, "--launcher", "ray"]),
                ("grpo one-step off-policy", "reinforce", [*grpo, "rollout.overlap=true", "--launcher", "ray"]),
            ):
                m = run(recipe, root / f"{name.replace(' ', '_')}_{r}", *extra)
                rows.setdefault(name, []).append(step_time(m))
                rewards[name] = [x["rollout/reward"] for x in m if "rollout/reward" in x]
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nmedian s/step over {args.repeats} rounds (steps 2..{args.steps})")
    for k, v in med.items():
        print(f"  {k:36s} {v:.3f}")
    print(f"Ray placement overhead (ppo ray / torchrun): {med['ppo ray'] / med['ppo torchrun']:.3f}x")
    off, on = med["grpo one-step off-policy"], med["grpo on-policy (generator actor)"]
    print(f"one-step off-policy speed-up (on / off): {on / off:.3f}x")
    for k in ("grpo on-policy (generator actor)", "grpo one-step off-policy"):
        print(f"  reward curve {k}: {[round(x, 3) for x in rewards[k]]}")


if __name__ == "__main__":
    main()
