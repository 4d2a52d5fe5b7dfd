#!/usr/bin/env python
"""alignkit SFT vs TRL's SFTTrainer: steady-state training throughput on this machine.

Both frameworks train the same randomly initialised Llama (saved once to disk, loaded by
both), on the same generated prompt/completion data (same chat template, so the same
tokens), with the same sequence length (packing in both), global batch, optimizer (AdamW,
same hyper-parameters), loss on completion tokens only, and bf16 autocast. Each runs in its
own subprocess with its fastest settings on CPU (see `--help` and docs/benchmarks.md).

Reported per framework: real (non-pad) tokens per second in steady state, i.e. the tokens
of the steps after `--warmup` divided by the wall time between the end of the last warm-up
step and the end of the last step (so data collation, optimizer, logging are all included).
For alignkit also the achieved FLOP/s as a fraction of the `torch.mm` peak measured here
(2048 x 2048, fp32 and bf16). FLOPs per step (stated in the output):

    model FLOPs    = 6 * N_nonemb * tokens + 6 * n_layers * d_model * sum_i L_i^2
    N_nonemb       = all parameters except the input embedding (the LM head counts)
    L_i            = length of each attention segment (packed example; causal, so the
                     useful QK^T and AV work is L^2/2 per matmul, x2 matmuls, x3 fwd+bwd)
    "needed" FLOPs = the same but the LM head counted only on loss (completion) tokens:
                     6 * (N_nonemb - V*d) * tokens + 6 * V * d * loss_tokens + attention

    .venv/bin/python benchmarks/sft_vs_trl.py            # the real measurement (~5 min)
    .venv/bin/python benchmarks/sft_vs_trl.py --quick    # smoke test (~1.5 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--steps", type=int, default=None, help="measured optimizer steps per framework (default 16; 3 with --quick)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="steps excluded from the measurement (default 4; 2 with --quick)"
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=None, help="default: 2.6875 x hidden (1376 for 512)")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary trained on the generated data")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="global batch in packed rows of --seq-len tokens")
    p.add_argument("--alignkit-micro", type=int, default=8, help="alignkit train.micro_batch_size (rows)")
    p.add_argument(
        "--trl-micro", type=int, default=4, help="TRL per_device_train_batch_size (accumulation = batch / micro)"
    )
    p.add_argument("--alignkit-compile", choices=["on", "off"], default="on", help="model.compile")
    p.add_argument("--trl-compile", choices=["on", "off"], default="on", help="TrainingArguments.torch_compile")
    p.add_argument(
        "--trl-packing",
        choices=["wrapped", "bfd"],
        default="wrapped",
        help="TRL packing_strategy (bfd implies padding_free)",
    )
    p.add_argument("--trl-padding-free", action="store_true", help="TRL padding_free=True (forced by bfd)")
    p.add_argument("--only", choices=["alignkit", "trl"], default=None, help="run one framework only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="a few steps of a smaller model: checks that everything runs")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (model, data, run outputs)")
    p.add_argument("--json", type=str, default=None, help="also write the results as JSON here")
    p.add_argument("--worker", choices=["alignkit", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=str, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.steps = a.steps or 3
        a.warmup = a.warmup if a.warmup is not None else 2
        if "--hidden" not in (argv or sys.argv):
            a.hidden, a.layers, a.heads, a.kv_heads = 256, 4, 4, 4
        if "--seq-len" not in (argv or sys.argv):
            a.seq_len = 256
    a.steps = a.steps or 16
    a.warmup = a.warmup if a.warmup is not None else 4
    a.intermediate = a.intermediate or int(round(a.hidden * 2.6875 / 16) * 16)
    return a


# ---------------------------------------------------------------------------------------
# peak matmul throughput
# ---------------------------------------------------------------------------------------


def matmul_peak(n: int = 2048, reps: int = 10) -> dict[str, float]:
    """Best-of-`reps` GFLOP/s of an n x n x n torch.mm, fp32 and bf16 (never fp16: slow on this CPU)."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b)
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n**3 / best / 1e9
    return out


# ---------------------------------------------------------------------------------------
# shared inputs: tokenizer, model, data
# ---------------------------------------------------------------------------------------


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))))
    return sorted(out)


def _text(rng: random.Random, vocab: list[str], weights: list[float], n_words: int) -> str:
    words = rng.choices(vocab, weights=weights, k=n_words)
    out, sentence = [], 0
    for w in words:
        out.append(w)
        sentence += 1
        if sentence > 6 and rng.random() < 0.12:
            out[-1] += rng.choice([".", ".", ",", "?", ";"])
            sentence = 0
    return " ".join(out) + "."


def _length(rng: random.Random, median: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), 0.6))))


def prepare(workdir: Path, a: argparse.Namespace) -> dict:
    """Write the tokenizer + random Llama (model/) and the data (train.jsonl) into workdir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.models.tokenizer import train_bpe_tokenizer

    rng = random.Random(0)
    vocab = _words(rng, 6000)
    weights = [1.0 / (i + 10) for i in range(len(vocab))]  # Zipf-like word frequencies
    # Prompt/completion word counts: log-normal, completion ~2x prompt (median ~45 / ~90 words).
    # About a third of the tokens are prompt tokens (no loss), as in typical SFT data.
    records = []
    # Enough examples for ~2x the rows the run consumes (mean example ~210 tokens at seq 512).
    n_records = max(400, 2 * a.batch * (a.steps + a.warmup + 1) * a.seq_len // 200)
    for _ in range(n_records):
        prompt = _text(rng, vocab, weights, _length(rng, 45, 4, 400))
        completion = _text(rng, vocab, weights, _length(rng, 90, 4, 400))
        records.append((prompt, completion))
    tokenizer = train_bpe_tokenizer([t for r in records[:3000] for t in r], vocab_size=a.vocab)

    # Keep only examples that fit in seq_len, so neither framework truncates or drops anything.
    kept, n_tokens, n_prompt = [], 0, 0
    for prompt, completion in records:
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        head = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        n = len(tokenizer(full, add_special_tokens=False)["input_ids"])
        if n <= a.seq_len:
            kept.append({"prompt": prompt, "completion": completion})
            n_tokens += n
            n_prompt += len(tokenizer(head, add_special_tokens=False)["input_ids"])
    data = workdir / "train.jsonl"
    with data.open("w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")

    model_dir = workdir / "model"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        intermediate_size=a.intermediate,
        max_position_embeddings=max(2048, a.seq_len),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    return {
        "workdir": str(workdir),
        "model_dir": str(model_dir),
        "data": str(data),
        "n_examples": len(kept),
        "mean_tokens": n_tokens / len(kept),
        "prompt_fraction": n_prompt / n_tokens,
        "n_params": n_params,
        "n_nonemb": n_params - n_embed,
        "vocab": len(tokenizer),
        "hidden": a.hidden,
        "layers": a.layers,
        "heads": a.heads,
        "kv_heads": a.kv_heads,
        "intermediate": a.intermediate,
        "seq_len": a.seq_len,
        "batch": a.batch,
        "steps": a.steps,
        "warmup": a.warmup,
        "threads": a.threads,
        "alignkit_micro": a.alignkit_micro,
        "alignkit_compile": a.alignkit_compile == "on",
        "trl_micro": a.trl_micro,
        "trl_compile": a.trl_compile == "on",
        "trl_packing": a.trl_packing,
        "trl_padding_free": a.trl_padding_free or a.trl_packing == "bfd",
        "lr": 1e-4,
        "weight_decay": 0.01,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "grad_clip": 1.0,
    }


# ---------------------------------------------------------------------------------------
# workers (each framework in its own process)
# ---------------------------------------------------------------------------------------


class StepRecorder:
    """Per optimizer step: wall-clock end time, real tokens, loss tokens, sum of squared
    attention-segment lengths."""

    def __init__(self):
        self.ends: list[float] = []
        self.steps: list[dict] = []
        self._pending = {"tokens": 0, "loss_tokens": 0, "sq": 0}

    def add(self, tokens: int, loss_tokens: int, sq: int) -> None:
        self._pending["tokens"] += tokens
        self._pending["loss_tokens"] += loss_tokens
        self._pending["sq"] += sq

    def end_step(self) -> None:
        self.ends.append(time.perf_counter())
        self.steps.append(self._pending)
        self._pending = {"tokens": 0, "loss_tokens": 0, "sq": 0}

    def dump(self, path: str, extra: dict) -> None:
        Path(path).write_text(json.dumps({"ends": self.ends, "steps": self.steps, **extra}))


def worker_alignkit(spec: dict) -> None:
    import yaml

    import alignkit.recipes.sft as sft
    from alignkit.config import load_config
    from alignkit.training import logging as ak_logging

    rec = StepRecorder()

    # Measurement hooks (cheap, per micro-batch): count tokens/segments from the collated rows
    # and timestamp each optimizer step when the loop logs it (log_every=1).
    collate_rows = sft.collate_rows

    def counting_collate(rows, pad_id):
        batch = collate_rows(rows, pad_id=pad_id)
        lengths = [len(e.input_ids) for row in rows for e in row or []]
        rec.add(sum(lengths), batch["num_units"], sum(n * n for n in lengths))
        return batch

    sft.collate_rows = counting_collate
    log = ak_logging.MetricLogger.log

    def timed_log(self, step, metrics):
        if "throughput/tokens_per_s" in metrics:
            rec.end_step()
        return log(self, step, metrics)

    ak_logging.MetricLogger.log = timed_log

    out = Path(spec["workdir"]) / "alignkit_run"
    cfg_dict = {
        "recipe": "sft",
        "output_dir": str(out),
        "model": {"path": spec["model_dir"], "precision": "bf16_autocast", "compile": spec["alignkit_compile"]},
        "data": {"train": {"path": spec["data"]}, "max_seq_len": spec["seq_len"], "pack": True},
        "optim": {
            "lr": spec["lr"],
            "weight_decay": spec["weight_decay"],
            "betas": spec["betas"],
            "eps": spec["eps"],
            "schedule": "constant",
            "warmup_steps": 0,
            "grad_clip": spec["grad_clip"],
        },
        "train": {
            "max_steps": spec["warmup"] + spec["steps"],
            "global_batch_size": spec["batch"],
            "micro_batch_size": spec["alignkit_micro"],
            "log_every": 1,
            "seed": 0,
        },
        "checkpoint": {"every": None, "save_final": False, "resume": False},
        "logging": {"tensorboard": False, "progress": "lines"},
    }
    cfg_path = Path(spec["workdir"]) / "alignkit_sft.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    t0 = time.perf_counter()
    sft.main(load_config(sft.Config, cfg_path))
    own = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rec.dump(
        spec["result"],
        {
            "total_s": time.perf_counter() - t0,
            "own_tokens_per_s": [r["throughput/tokens_per_s"] for r in own if "throughput/tokens_per_s" in r],
            "own_step_s": [r["perf/step_time_s"] for r in own if "perf/step_time_s" in r],
            "loss": [r.get("loss") for r in own if "loss" in r],
        },
    )


def worker_trl(spec: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rec = StepRecorder()
    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    # Conversational prompt/completion: TRL renders it with the same chat template alignkit uses.
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in records
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    accumulation = spec["batch"] // spec["trl_micro"]
    args = SFTConfig(
        output_dir=str(Path(spec["workdir"]) / "trl_run"),
        max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=spec["trl_micro"],
        gradient_accumulation_steps=accumulation,
        learning_rate=spec["lr"],
        weight_decay=spec["weight_decay"],
        adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"],
        max_grad_norm=spec["grad_clip"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_length=spec["seq_len"],
        packing=True,
        packing_strategy=spec["trl_packing"],
        padding_free=spec["trl_padding_free"],
        completion_only_loss=True,
        bf16=True,
        use_cpu=True,
        torch_compile=spec["trl_compile"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        shuffle_dataset=False,
    )

    class Count(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["labels"]
            if "attention_mask" in inputs:  # padded rows (wrapped packing): causal over the row
                real = inputs["attention_mask"].sum(-1)
                rec.add(int(real.sum()), int((labels[:, 1:] != -100).sum()), int((real * real).sum()))
            else:  # padding-free: one flattened row, segments restart at position 0
                pos = inputs["position_ids"][0]
                starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
                seg = [e - s for s, e in zip(starts[:-1], starts[1:])]
                rec.add(pos.numel(), int((labels[:, 1:] != -100).sum()), sum(n * n for n in seg))
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            rec.end_step()

    t0 = time.perf_counter()
    trainer = Count(model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[Clock()])
    setup_s = time.perf_counter() - t0
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rec.dump(
        spec["result"],
        {
            "total_s": time.perf_counter() - t0,
            "setup_s": setup_s,
            "train_runtime": out.metrics.get("train_runtime"),
            "loss": losses,
            "optim": str(args.optim),
        },
    )


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------


def run_worker(name: str, spec: dict) -> dict:
    spec = dict(spec, result=str(Path(spec["workdir"]) / f"{name}_result.json"))
    spec_path = Path(spec["workdir"]) / f"{name}_spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(
        os.environ, TOKENIZERS_PARALLELISM="false", TORCHINDUCTOR_CACHE_DIR=str(Path(spec["workdir"]) / "inductor")
    )
    cmd = [sys.executable, str(HERE), "--worker", name, "--spec", str(spec_path)]
    t0, busy0, ours0 = time.perf_counter(), _busy_cpu_s(), _children_cpu_s()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    # CPU time other processes on this machine used meanwhile (a shared machine slows both runs).
    others = max(0.0, (_busy_cpu_s() - busy0) - (_children_cpu_s() - ours0)) / wall
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{name} worker failed (exit {proc.returncode})")
    result = json.loads(Path(spec["result"]).read_text())
    result["process_s"] = wall
    result["other_cores"] = others
    return result


def _busy_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except OSError:
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarize(result: dict, spec: dict) -> dict:
    """Steady state: steps after the warm-up, wall time from the end of the last warm-up step."""
    w = spec["warmup"]
    ends, steps = result["ends"], result["steps"]
    measured = steps[w:]
    seconds = ends[-1] - ends[w - 1] if w > 0 else ends[-1] - ends[0]
    if w == 0:
        measured = steps[1:]
    tokens = sum(s["tokens"] for s in measured)
    loss_tokens = sum(s["loss_tokens"] for s in measured)
    sq = sum(s["sq"] for s in measured)
    d, layers, V = spec["hidden"], spec["layers"], spec["vocab"]
    attention = 6 * layers * d * sq
    model_flops = 6 * spec["n_nonemb"] * tokens + attention
    needed_flops = 6 * (spec["n_nonemb"] - V * d) * tokens + 6 * V * d * loss_tokens + attention
    step_times = [b - a for a, b in zip(ends[:-1], ends[1:])]
    return {
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "steps": len(measured),
        "tokens_per_step": tokens / len(measured),
        "loss_tokens_per_step": loss_tokens / len(measured),
        "model_flops_per_s": model_flops / seconds,
        "needed_flops_per_s": needed_flops / seconds,
        "attention_share": attention / model_flops,
        "step_times": [round(t, 3) for t in step_times],
        "process_s": result.get("process_s"),
        "other_cores": result.get("other_cores"),
        "loss_first_last": (result["loss"][0], result["loss"][-1]) if result.get("loss") else None,
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.worker:
        spec = json.loads(Path(a.spec).read_text())
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        (worker_alignkit if a.worker == "alignkit" else worker_trl)(spec)
        return

    import torch

    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="sft_vs_trl_"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
        f"work dir {workdir}",
        flush=True,
    )
    peaks = [matmul_peak()]
    print(f"torch.mm 2048^3: fp32 {peaks[0]['fp32']:.0f} GFLOP/s, bf16 {peaks[0]['bf16']:.0f} GFLOP/s", flush=True)
    spec = prepare(workdir, a)
    print(
        f"model: Llama hidden {spec['hidden']}, {spec['layers']} layers, {spec['heads']} heads "
        f"({spec['kv_heads']} kv), intermediate {spec['intermediate']}, vocab {spec['vocab']}: "
        f"{spec['n_params'] / 1e6:.1f}M params ({spec['n_nonemb'] / 1e6:.1f}M non-embedding)\n"
        f"data: {spec['n_examples']} prompt/completion examples, mean {spec['mean_tokens']:.0f} tokens, "
        f"{100 * spec['prompt_fraction']:.0f}% prompt tokens; seq len {spec['seq_len']} packed, "
        f"global batch {spec['batch']} rows, {a.warmup} warm-up + {a.steps} measured steps",
        flush=True,
    )
    results = {}
    for name in ("alignkit", "trl"):
        if a.only and a.only != name:
            continue
        raw = run_worker(name, spec)
        results[name] = summarize(raw, spec)
        r = results[name]
        loss = r["loss_first_last"]
        print(
            f"{name:9s} {r['tokens_per_s']:8.0f} tokens/s  ({r['tokens_per_step']:.0f} tokens/step, "
            f"{r['seconds']:.1f} s measured, process {r['process_s']:.0f} s, "
            f"loss {loss[0]:.2f} -> {loss[1]:.2f}, other processes used {r['other_cores']:.1f} cores meanwhile; "
            f"step times {r['step_times']})",
            flush=True,
        )
        peaks.append(matmul_peak())
    # The peak is measured before and after each run (the machine may be shared); the best is used.
    peak = {k: max(p[k] for p in peaks) for k in ("fp32", "bf16")}

    settings = {
        "alignkit": f"model.precision=bf16_autocast, model.compile={str(spec['alignkit_compile']).lower()}, "
        f"data.pack=true, train.micro_batch_size={spec['alignkit_micro']} "
        f"(accumulation {spec['batch'] // spec['alignkit_micro']}), AdamW (torch default, foreach)",
        "trl": f"bf16=True, use_cpu=True, torch_compile={spec['trl_compile']}, packing=True, "
        f"packing_strategy={spec['trl_packing']!r}, padding_free={spec['trl_padding_free']}, "
        f"per_device_train_batch_size={spec['trl_micro']} (accumulation {spec['batch'] // spec['trl_micro']}), "
        f"completion_only_loss=True, optim=adamw_torch_fused (default)",
    }
    print(f"\n=== SFT throughput, steady state (load average now {os.getloadavg()[0]:.2f}) ===")
    print(
        f"torch.mm 2048^3 peak (best of {len(peaks)} measurements): fp32 {peak['fp32']:.0f} GFLOP/s, "
        f"bf16 {peak['bf16']:.0f} GFLOP/s"
    )
    for name, r in results.items():
        print(f"{name:9s} {r['tokens_per_s']:8.0f} tokens/s   [{settings[name]}]")
    if len(results) == 2:
        print(f"ratio alignkit / TRL: {results['alignkit']['tokens_per_s'] / results['trl']['tokens_per_s']:.2f}x")
    for name, r in results.items():
        m, n = r["model_flops_per_s"] / 1e9, r["needed_flops_per_s"] / 1e9
        print(
            f"{name:9s} model FLOP/s {m:5.0f} G = {100 * m / peak['bf16']:.0f}% of the bf16 peak "
            f"({100 * m / peak['fp32']:.0f}% of fp32); 'needed' {n:.0f} G = {100 * n / peak['bf16']:.0f}% of bf16; "
            f"attention {100 * r['attention_share']:.1f}% of model FLOPs"
        )
    print(
        "FLOPs per step: model = 6*N_nonemb*tokens + 6*layers*d_model*sum(L_i^2) (causal attention within each "
        "attention segment L_i: a packed example for alignkit and TRL bfd, a whole row for TRL wrapped); "
        "'needed' counts the LM head (V*d) only on loss tokens."
    )
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"peak_gflops": peak, "peaks": peaks, "spec": spec, "settings": settings, "results": results}, indent=2
            )
        )
    if not a.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
