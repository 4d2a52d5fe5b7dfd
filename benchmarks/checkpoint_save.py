"""Checkpoint save time and peak host memory: sharded DCP (each rank writes its shards) vs the
former full-state gather on rank 0, for a ~134M-parameter Llama under FSDP2 on 2 gloo processes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/checkpoint_save.py dcp
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/checkpoint_save.py async
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/checkpoint_save.py gather
    ... final | final-gather     (final/ in HF format: streamed weight by weight, or gathered whole)

Each method in its own launch (peak RSS is per process). Prints, per rank, the save's seconds and
its peak resident memory above what the rank held before saving (sampled every 2 ms).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from alignkit.config import OptimConfig
from alignkit.models.loading import meta_skeleton, save_causal_lm, save_hf_streamed, saved_weight_names
from alignkit.models.tokenizer import byte_tokenizer
from alignkit.training.checkpoint import save_checkpoints, wait_for_checkpoint
from alignkit.training.distributed import full_state_dict, full_tensor, init_distributed, wrap_model
from alignkit.training.optim import build_optimizer, build_scheduler


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    def __enter__(self):
        self.base, self.peak, self.running = rss(), rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())


def main(method: str) -> None:
    torch.set_num_threads(1)
    d = init_distributed("gloo")
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = wrap_model(LlamaForCausalLM(config), d, "fsdp")
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    scheduler = build_scheduler(optimizer, 10, OptimConfig(lr=1e-4))
    model(torch.randint(0, 32000, (1, 16)), labels=torch.randint(0, 32000, (1, 16))).loss.backward()
    optimizer.step()  # Adam's moments exist: the state is 16 bytes per parameter
    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    tokenizer = byte_tokenizer()
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-")) if d.is_main else None
    shared = [root]
    dist.broadcast_object_list(shared)
    root = shared[0]
    dist.barrier()
    with PeakRss() as mem:
        t0 = time.perf_counter()
        if method in ("final", "final-gather"):  # final/ streamed weight by weight vs gathered whole
            model_dir = root / "final"
            if method == "final":
                names = saved_weight_names(meta_skeleton(model))
                tensors = model.state_dict(keep_vars=True)
                specs = {n: (tensors[n].shape, tensors[n].dtype) for n in names}
                save_hf_streamed(
                    meta_skeleton(model), specs, lambda n: full_tensor(tensors[n]), tokenizer, model_dir, d.is_main
                )
            else:
                state, _ = full_state_dict(model)
                if d.is_main:
                    save_causal_lm(model, state, tokenizer, model_dir)
            dist.barrier()
        elif method in ("dcp", "async"):
            save_checkpoints(root, 1, {"model": (model, optimizer, scheduler)}, d, 1, async_save=method == "async")
            blocked = time.perf_counter() - t0  # training could go on from here
            wait_for_checkpoint(d)
            dist.barrier()
        else:  # what checkpoint.py did before: gather everything on rank 0's CPU, torch.save there
            model_state, optim_state = full_state_dict(model, optimizer)
            if d.is_main:
                torch.save({"model": model_state, "optimizer": optim_state}, root / "state.pt")
            dist.barrier()
        seconds = time.perf_counter() - t0
    blocked = blocked if method in ("dcp", "async") else seconds
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    rows = [None] * d.world_size
    dist.all_gather_object(rows, (d.rank, seconds, blocked, (mem.peak - mem.base) / 2**20, mem.base / 2**20))
    if d.is_main:
        print(f"{method}: {params / 1e6:.0f}M parameters, checkpoint {size / 2**20:.0f} MiB on disk")
        for rank, sec, blocked, extra, base in rows:
            print(
                f"  rank {rank}: {sec:.2f} s ({blocked:.2f} s blocking training), "
                f"peak RSS +{extra:.0f} MiB over {base:.0f} MiB before saving"
            )
        shutil.rmtree(root)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
