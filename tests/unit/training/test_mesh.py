"""The device-mesh arithmetic: `distributed.mesh` against the number of processes, and where a rank sits."""

import pytest
import torch

from alignkit.config import ConfigError, MeshConfig
from alignkit.training.distributed import Dist, _mesh_shape


def test_the_mesh_multiplies_out_to_the_processes():
    assert _mesh_shape(MeshConfig(), 8) == (1, 1)  # FSDP over all
    assert _mesh_shape(MeshConfig(dp_replicate=2, tp=2), 8) == (2, 2)  # dp_shard: the 2 that remain
    assert _mesh_shape(MeshConfig(dp_replicate=2, dp_shard=2, tp=2), 8) == (2, 2)
    with pytest.raises(ConfigError, match=r"dp_replicate 1 x dp_shard the rest x tp 3 .* 8 processes"):
        _mesh_shape(MeshConfig(tp=3), 8)
    with pytest.raises(ConfigError, match=r"dp_replicate 2 x dp_shard 4 x tp 2 .* 8 processes"):
        _mesh_shape(MeshConfig(dp_replicate=2, dp_shard=4, tp=2), 8)


def test_a_tensor_parallel_group_is_one_data_parallel_rank():
    cpu = torch.device("cpu")
    ranks = [Dist(rank=r, world_size=8, local_rank=r, device=cpu, dp_replicate=2, tp=2) for r in range(8)]
    assert [d.dp_rank for d in ranks] == [0, 0, 1, 1, 2, 2, 3, 3]  # tp innermost: neighbours share a batch
    assert {(d.dp_size, d.dp_shard) for d in ranks} == {(4, 2)}
    plain = Dist(rank=3, world_size=4, local_rank=3, device=cpu)
    assert (plain.dp_rank, plain.dp_size, plain.dp_shard) == (3, 4, 4)
