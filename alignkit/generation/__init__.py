"""The rollout engine: one interface over the generation backends (`engine`: `build_engine`,
`Engine.generate`, `Engine.update_weights`), the native batched KV-cache sampler with stop
strings (`sampler`, wrapped by `native`), the vLLM backend (`vllm`, an optional extra), the one
sampling loop over a prompt set (`batches`) and whole prompt datasets sampled to JSONL
(`offline`, `alignkit generate`). Import from the modules named in `__all__`.
"""

__all__ = ["batches", "engine", "native", "offline", "sampler", "vllm"]
