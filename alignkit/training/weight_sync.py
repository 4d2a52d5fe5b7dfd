"""New policy weights from the trainer to generation engines in other processes, in memory: a
process group of its own between one sender (the trainer's rank 0, rank 0 here) and the engines
(ranks 1..E), over which the weights are broadcast in a few large buckets. It is created from a
TCPStore of its own, outside the default group, so neither the trainer's collectives nor the
engines' are touched (the pattern OpenRLHF and veRL use; vLLM calls it a stateless process group).

Every step has a timeout: an engine that never joins, or a trainer that never sends, ends in a
WeightSyncError naming the channel's address and rank (the hang peers' users report most).
Gloo on CPU; on GPU the same group with NCCL carries CUDA tensors.

    channel = WeightChannel("10.0.0.1", 29600, rank=0, world=3)       # the trainer
    channel.send(model.state_dict().items())
    channel = WeightChannel("10.0.0.1", 29600, rank=1, world=3)       # each engine
    engine.load_weights(channel.receive())
"""

from __future__ import annotations

import datetime
import pickle
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

__all__ = ["WeightChannel", "WeightSyncError"]

Tensor = torch.Tensor


class WeightSyncError(RuntimeError):
    """The channel could not be set up or a broadcast did not complete in time."""


class WeightChannel:
    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world: int,
        timeout_s: float = 300.0,
        device: str = "cpu",
        bucket_mib: int = 256,
    ):
        self.where = f"weight sync over {host}:{port} (rank {rank} of {world})"
        self.rank, self.device, self.timeout_s = rank, torch.device(device), timeout_s
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.bucket_bytes = bucket_mib * 2**20
        try:
            store = dist.TCPStore(host, port, world, rank == 0, timeout=self.timeout)
        except Exception as exc:  # the trainer (rank 0, the store's host) never came up
            message = f"{self.where}: could not meet the other ranks within {timeout_s:g} s ({exc})"
            raise WeightSyncError(message) from None
        if self.device.type == "cuda":
            self.group = dist.ProcessGroupNCCL(store, rank, world)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, world, self.timeout)

    def send(self, named: Iterable[tuple[str, Tensor]]) -> int:
        """Rank 0: broadcast (name, tensor) pairs; the bytes sent."""
        pairs = [(name, t.detach()) for name, t in named]
        header = [(name, tuple(t.shape), t.dtype) for name, t in pairs]
        self._header(header)
        sent = 0
        for bucket in self._buckets(header):
            flat = torch.cat([pairs[i][1].reshape(-1).to(self.device) for i in bucket])  # (numel,) one dtype
            self._broadcast(flat, f"weights ({len(bucket)} tensors)")
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self) -> list[tuple[str, Tensor]]:
        """Ranks > 0: the (name, tensor) pairs rank 0 sent, on this channel's device, in its order."""
        return list(self.stream())

    def stream(self) -> Iterator[tuple[str, Tensor]]:
        """As `receive`, one bucket at a time: a consumer that copies each tensor away (an engine's
        weight loader) holds one bucket at a time, never the whole model. Iterate to the end: the
        sender waits for every bucket's broadcast."""
        header = self._header(None)
        for bucket in self._buckets(header):
            dtype = header[bucket[0]][2]
            numels = [_numel(header[i][1]) for i in bucket]
            flat = torch.empty(sum(numels), dtype=dtype, device=self.device)
            self._broadcast(flat, f"weights ({len(bucket)} tensors)")
            for i, piece in zip(bucket, flat.split(numels)):
                yield header[i][0], piece.view(header[i][1])

    def close(self) -> None:
        self.group = None

    # --- internals ---------------------------------------------------------------------------------

    def _header(self, header: list | None) -> list:
        """The names, shapes and dtypes, pickled into a byte tensor (its length first)."""
        payload = pickle.dumps(header) if header is not None else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        self._broadcast(size, "the header's size")
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        if header is not None:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        self._broadcast(data, "the header")
        return header if header is not None else pickle.loads(data.cpu().numpy().tobytes())

    def _buckets(self, header: list) -> list[list[int]]:
        """Tensor indices grouped by dtype, consecutive, up to `bucket_mib` each (a larger tensor alone)."""
        buckets: list[list[int]] = []
        size = 0
        for i, (_, shape, dtype) in enumerate(header):
            nbytes = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
            if not buckets or header[buckets[-1][0]][2] != dtype or size + nbytes > self.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(i)
            size += nbytes
        return buckets

    def _broadcast(self, tensor: Tensor, what: str) -> None:
        try:
            self.group.broadcast(tensor, 0, self.timeout).wait()
        except Exception as exc:  # a timeout, or a peer that went away
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightSyncError(f"{self.where}: broadcasting {what} failed or timed out ({first})") from None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
