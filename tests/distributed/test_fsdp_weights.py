"""An FSDP-sharded policy read whole on 2 gloo processes: the weights pushed to a generation engine
(`merged_weights`, LoRA merged) and the model `gathered` for sampling equal the unsharded model's,
and a gathered model's forwards run without collectives (one rank may run more than another)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.distributed


def main(kind: str) -> None:
    import torch
    import torch.distributed as dist

    from alignkit.config import DistributedConfig, LoraConfig, ModelConfig, RandomInitConfig
    from alignkit.generation.vllm import merged_weights
    from alignkit.models.loading import gathered, load_causal_lm, load_tokenizer
    from alignkit.training.distributed import init_distributed, wrap_model

    d = init_distributed()
    cfg = ModelConfig(random_init=RandomInitConfig(), lora=LoraConfig(enabled=kind == "lora", r=4))
    model = load_causal_lm(cfg, load_tokenizer(cfg), seed=0)
    with torch.no_grad():  # adapters that are not zero, so that the merge shows
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    want = dict(merged_weights(model))
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model = wrap_model(model, d, DistributedConfig())
    assert all(hasattr(p, "full_tensor") for p in model.parameters())  # sharded
    got = dict(merged_weights(model))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with gathered(model), torch.no_grad():
        for _ in range(1 + 2 * d.rank):  # rank 1 runs three forwards, rank 0 one: no collective inside
            assert torch.allclose(model(input_ids=ids).logits, logits, atol=1e-5)
    assert all(hasattr(p, "full_tensor") for p in model.parameters())  # sharded again
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {d.rank} ok")


@pytest.mark.parametrize("kind", ["plain", "lora"])
def test_sharded_policy_read_whole(kind):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__, kind],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout


if __name__ == "__main__":
    main(sys.argv[1])
