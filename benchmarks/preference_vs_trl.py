#!/usr/bin/env python
"""alignkit DPO and reward-model training vs TRL's DPOTrainer and RewardTrainer: steps/s.

Both frameworks train the same randomly initialised Llama (saved once, loaded by both) on the
same task-world preference pairs (prompt, chosen, rejected; rendered with the same chat
template, so the same tokens), with the same global batch of pairs, maximum length, optimizer
(AdamW, constant learning rate) and bf16 autocast. Each runs in its own subprocess with its
fastest settings found on this CPU (listed in the output and in docs/benchmarks.md):

  DPO   both with the reference log-probabilities PRECOMPUTED before training (alignkit's
        cached reference, TRL's `precompute_ref_log_probs=True`); the precomputation is timed
        separately. Measured: optimizer steps/s in steady state.
  RM    Bradley-Terry reward model, a scalar head on the same backbone. Steps/s.

Steady state = the steps after `--warmup`, timed from the end of the last warm-up step to the
end of the last step (data collation, optimizer and logging included).

    .venv/bin/python benchmarks/preference_vs_trl.py              # both tasks (~6 min)
    .venv/bin/python benchmarks/preference_vs_trl.py --task dpo   # one of them
    .venv/bin/python benchmarks/preference_vs_trl.py --quick      # smoke run
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
    p.add_argument("--task", choices=["dpo", "rm", "both"], default="both")
    p.add_argument("--steps", type=int, default=12, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the measurement")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the task-world pairs")
    p.add_argument(
        "--model-vocab",
        type=int,
        default=None,
        help="the model's vocabulary size (>= --vocab; extra rows unused): the LM head cost of a real "
        "model, e.g. 32000 (Llama 2) or 128256 (Llama 3)",
    )
    p.add_argument("--pairs", type=int, default=16, help="global batch in preference pairs")
    p.add_argument("--alignkit-micro", type=int, default=8, help="alignkit micro-batch (pairs); 8 was fastest of 8, 16")
    p.add_argument(
        "--trl-micro",
        type=int,
        default=8,
        help="TRL per-device batch (pairs); 8 was fastest of 8, 16 for DPO (tied for RM)",
    )
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument(
        "--alignkit-compile", choices=["on", "off"], default="on", help="model.compile (per-layer torch.compile)"
    )
    p.add_argument(
        "--trl-compile",
        choices=["on", "off", "rm-only"],
        default="rm-only",
        help="TrainingArguments.torch_compile; 'rm-only': TRL 1.16's DPOTrainer fails with "
        "torch_compile + precompute_ref_log_probs ('LlamaForCausalLM does not support len()')",
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=str, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.hidden, a.layers, a.heads = 3, 1, 128, 2, 4
        a.alignkit_compile, a.trl_compile = "off", "off"
    return a


# --- shared inputs ------------------------------------------------------------------------


def prepare(workdir: Path, a: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.models.tokenizer import train_bpe_tokenizer
    from alignkit.tasks.datasets import preference_records

    n = a.pairs * (a.steps + a.warmup + 2)
    records = preference_records(n, seed=0)
    tokenizer = train_bpe_tokenizer(
        [r[k] for r in records for k in ("prompt", "chosen", "rejected")], vocab_size=a.vocab
    )
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in records))
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), a.model_vocab or 0),
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
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[k]}], tokenize=False
        )
        for r in records
        for k in ("chosen", "rejected")
    ]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return {
        "workdir": str(workdir),
        "model_dir": str(workdir / "model"),
        "data": str(data),
        "records": len(records),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": config.vocab_size,
        "mean_len": sum(lengths) / len(lengths),
        "steps": a.steps,
        "warmup": a.warmup,
        "pairs": a.pairs,
        "alignkit_micro": a.alignkit_micro,
        "trl_micro": a.trl_micro,
        "max_len": a.max_len,
        "alignkit_compile": a.alignkit_compile == "on",
        "trl_compile": a.trl_compile,
        "lr": 5e-5,
    }


# --- workers --------------------------------------------------------------------------------


def _timed_metric_logger(ends: list[float]):
    from alignkit.training import logging as ak_logging

    log = ak_logging.MetricLogger.log

    def timed(self, step, metrics):
        if "throughput/tokens_per_s" in metrics:
            ends.append(time.perf_counter())
        return log(self, step, metrics)

    ak_logging.MetricLogger.log = timed


def worker_alignkit(task: str, spec: dict) -> dict:
    import yaml

    from alignkit.config import load_config

    ends: list[float] = []
    _timed_metric_logger(ends)
    recipe = "dpo" if task == "dpo" else "reward_model"
    module = __import__(f"alignkit.recipes.{recipe}", fromlist=["main"])
    out = Path(spec["workdir"]) / f"alignkit_{task}"
    cfg = {
        "recipe": recipe,
        "output_dir": str(out),
        "model": {"path": spec["model_dir"], "precision": "bf16_autocast", "compile": spec["alignkit_compile"]},
        "data": {"train": {"path": spec["data"]}, "max_seq_len": spec["max_len"]},
        "optim": {"lr": spec["lr"], "schedule": "constant", "weight_decay": 0.0},
        "train": {
            "max_steps": spec["warmup"] + spec["steps"],
            "global_batch_size": spec["pairs"],
            "micro_batch_size": spec["alignkit_micro"],
            "log_every": 1,
            "seed": 0,
        },
        "checkpoint": {"every": None, "save_final": False, "resume": False},
        "logging": {"tensorboard": False, "progress": "none"},
    }
    if task == "dpo":
        cfg["loss"] = {"type": "dpo", "beta": 0.1}
        cfg["reference"] = {"mode": "cached", "cache_dir": str(out / "cache")}
    else:
        cfg["loss"] = {"type": "bt"}
        cfg["normalization_samples"] = 0
    path = Path(spec["workdir"]) / f"alignkit_{task}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    module.main(load_config(module.Config, path))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"ends": ends, "start": t0, "loss": [m["loss"] for m in metrics if "loss" in m]}


def worker_trl(task: str, spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    records = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in records
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    common = dict(
        output_dir=str(Path(spec["workdir"]) / f"trl_{task}"),
        max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=spec["trl_micro"],
        gradient_accumulation_steps=spec["pairs"] // spec["trl_micro"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        bf16=True,
        use_cpu=True,
        torch_compile=spec["trl_compile"] == "on" or (spec["trl_compile"] == "rm-only" and task == "rm"),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        max_length=spec["max_len"],
    )
    t0 = time.perf_counter()
    if task == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
        args = DPOConfig(
            **common, beta=0.1, precompute_ref_log_probs=True, padding_free=spec.get("trl_padding_free", False)
        )
        trainer = DPOTrainer(
            model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[Clock()]
        )
    else:
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        args = RewardConfig(**common)
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[Clock()]
        )
    trainer.train()
    return {"ends": ends, "start": t0, "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def run_worker(name: str, task: str, spec: dict) -> dict:
    spec_path = Path(spec["workdir"]) / f"{name}_{task}_spec.json"
    result_path = Path(spec["workdir"]) / f"{name}_{task}_result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    env = dict(
        os.environ, TOKENIZERS_PARALLELISM="false", TORCHINDUCTOR_CACHE_DIR=str(Path(spec["workdir"]) / "inductor")
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE), "--worker", f"{name}:{task}", "--spec", str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{name} {task} worker failed (exit {proc.returncode})")
    raw = json.loads(result_path.read_text())
    ends, w = raw["ends"], spec["warmup"]
    measured = len(ends) - w
    seconds = ends[-1] - ends[w - 1]
    return {
        "steps_per_s": measured / seconds,
        "step_s": seconds / measured,
        "before_first_step_s": ends[0] - raw["start"],
        "process_s": time.perf_counter() - t0,
        "loss_first_last": (raw["loss"][0], raw["loss"][-1]) if raw["loss"] else None,
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        name, task = a.worker.split(":")
        spec = json.loads(Path(a.spec).read_text())
        result = (worker_alignkit if name == "alignkit" else worker_trl)(task, spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="preference_vs_trl_"))
    spec = prepare(workdir, a)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model: Llama hidden {a.hidden}, "
        f"{a.layers} layers, vocabulary {spec['vocab']}, {spec['params'] / 1e6:.1f}M params; data: task-world pairs, "
        f"mean {spec['mean_len']:.0f} tokens per sequence; global batch {a.pairs} pairs; {a.warmup} warm-up + "
        f"{a.steps} measured steps; bf16 autocast; compile: alignkit {a.alignkit_compile}, TRL {a.trl_compile}",
        flush=True,
    )
    results = {}
    for task in ["dpo", "rm"] if a.task == "both" else [a.task]:
        for name in ("alignkit", "trl"):
            r = run_worker(name, task, spec)
            results[f"{task}/{name}"] = r
            print(
                f"{task:3s} {name:8s} {r['steps_per_s']:.3f} steps/s ({r['step_s']:.2f} s/step; "
                f"{r['before_first_step_s']:.1f} s set-up incl. reference log-probs; loss "
                f"{r['loss_first_last'][0]:.3f} -> {r['loss_first_last'][1]:.3f})",
                flush=True,
            )
        ratio = results[f"{task}/alignkit"]["steps_per_s"] / results[f"{task}/trl"]["steps_per_s"]
        results[f"{task}/ratio"] = ratio
        print(f"{task:3s} ratio alignkit / TRL: {ratio:.2f}x", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"spec": spec, "results": results}, indent=2))
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
