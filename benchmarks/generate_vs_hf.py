#!/usr/bin/env python
"""alignkit's KV-cache sampler vs a naive `transformers.generate` call: generated tokens per second.

Same model (the demo's SFT model if it exists, else a random Llama of the same size), same
prompts (held-out task-world prompts of varied lengths), same sampling (temperature 1, up to
`--max-new-tokens`, stop at EOS), same batch. "Naive" is what a user writes first: the prompts of
a batch left-padded together, `model.generate(..., do_sample=True)`, rows that finished early
kept in the batch until the longest ends. alignkit drops finished rows from the batch and the
cache, so a step's cost follows the rows still running. Throughput counts the tokens each
method actually generated (up to and including EOS), over wall time.

    .venv/bin/python benchmarks/generate_vs_hf.py              # ~1 min
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "runs/demo/sft/final"))
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.config import SamplingConfig
    from alignkit.generation.sampler import generate
    from alignkit.tasks.datasets import eval_prompt_records

    if not Path(a.model, "config.json").is_file():
        raise SystemExit(f"{a.model}: no model; run `make demo` first or pass --model DIR")
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    records = eval_prompt_records(a.prompts // 7 + 1)[: a.prompts]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        for r in records
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    batches = [ids[i : i + a.batch] for i in range(0, len(ids), a.batch)]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def run_alignkit() -> int:
        tokens = 0
        for k, batch in enumerate(batches):
            out = generate(
                model,
                batch,
                SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=1.0, seed=k),
                eos,
                pad,
                tokenizer.decode,
            )
            tokens += sum(len(c.token_ids) for c in out)
        return tokens

    def run_hf() -> int:
        tokens = 0
        tokenizer.padding_side = "left"
        for k, batch in enumerate(batches):
            enc = tokenizer.pad({"input_ids": batch}, return_tensors="pt")
            torch.manual_seed(k)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    use_cache=True,
                    max_new_tokens=a.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            for row in new.tolist():  # tokens up to and including the first EOS
                tokens += row.index(eos) + 1 if eos in row else len(row)
        return tokens

    results = {}
    for name, fn in (("alignkit", run_alignkit), ("transformers.generate", run_hf)):
        best = None
        for _ in range(a.repeats):
            t = time.perf_counter()
            tokens = fn()
            rate = tokens / (time.perf_counter() - t)
            best = rate if best is None else max(best, rate)
        results[name] = best
        print(f"{name:22s} {best:8.0f} generated tokens/s  ({tokens} tokens)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model {a.model} ({n_params / 1e6:.1f}M params, fp32), {len(ids)} prompts, batch {a.batch}, up to "
        f"{a.max_new_tokens} new tokens, temperature 1; best of {a.repeats}"
    )
    print(f"ratio alignkit / transformers.generate: {results['alignkit'] / results['transformers.generate']:.2f}x")


if __name__ == "__main__":
    main()
