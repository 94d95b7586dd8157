"""Identity samplers: P identities x K captions per (global) batch (IRRA's RandomIdentitySampler)
and SEN's ``idrannum`` variant, where each identity draws its K from 1..num_instance every epoch.

Their randomness comes from ``seed + epoch`` (``set_epoch``), so every DDP rank builds the same
global order and takes its own slice of each global batch; resuming at an epoch needs no state.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterator

from torch.utils.data import Sampler

from utils.errors import ConfigError


class RandomIdentitySampler(Sampler[int]):
    """Each epoch: shuffle every identity's samples (drawing K with replacement when it has fewer),
    cut them into chunks of K, then repeatedly pick P = batch_size // K distinct identities that
    still have chunks and emit one chunk of each. ``batch_size`` is the global batch."""

    def __init__(self, pids: list[int], batch_size: int, num_instances: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < num_instances or batch_size % num_instances:
            raise ConfigError(f"batch_size {batch_size} must be a multiple of num_instance {num_instances}")
        if batch_size % world_size:
            raise ConfigError(f"batch_size {batch_size} must be a multiple of the {world_size} processes")
        self.batch_size, self.num_instances = batch_size, num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.index_dic: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            self.index_dic[pid].append(index)
        self.pids = list(self.index_dic)
        if len(self.pids) < self.num_pids_per_batch:
            raise ConfigError(f"identity sampler needs {self.num_pids_per_batch} identities per batch, "
                              f"the data has {len(self.pids)}")
        self._local: tuple[int, list[int]] | None = None  # (epoch, this rank's indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def chunk_size(self, rng: random.Random) -> int:
        """Samples per chunk of one identity this epoch."""
        return self.num_instances

    def global_order(self) -> list[int]:
        rng = random.Random(self.seed + self.epoch)
        chunks: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            k = self.chunk_size(rng)
            idxs = list(self.index_dic[pid])
            if len(idxs) < k:
                idxs = rng.choices(idxs, k=k)
            rng.shuffle(idxs)
            usable = len(idxs) // k * k
            chunks[pid] = [idxs[i:i + k] for i in range(0, usable, k)]
        available = [pid for pid in self.pids if chunks[pid]]
        order: list[int] = []
        while len(available) >= self.num_pids_per_batch:
            for pid in rng.sample(available, self.num_pids_per_batch):
                order.extend(chunks[pid].pop(0))
                if not chunks[pid]:
                    available.remove(pid)
        return order

    def local_order(self) -> list[int]:
        """This rank's share of every global batch of this epoch's order. A final partial batch is
        split evenly (its remainder of fewer than ``world_size`` samples is left out)."""
        if self._local is None or self._local[0] != self.epoch:
            order = self.global_order()
            local: list[int] = []
            for b in range(0, len(order), self.batch_size):
                size = min(self.batch_size, len(order) - b) // self.world_size
                local.extend(order[b + self.rank * size:b + (self.rank + 1) * size])
            self._local = (self.epoch, local)
        return self._local[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self.local_order())

    def __len__(self) -> int:
        """The number of indices this epoch yields (the order is built to count them)."""
        return len(self.local_order())


class RandomIdNumSampler(RandomIdentitySampler):
    """SEN's ``idrannum``: as the identity sampler, but each identity's chunk size is drawn
    uniformly from 1..num_instance every epoch, so batches mix single samples and same-identity
    pairs (SEN's recipe: num_instance 2). P = batch_size // num_instance identities per group;
    groups are not aligned to batches when chunks are smaller than num_instance."""

    def chunk_size(self, rng: random.Random) -> int:
        return rng.randint(1, self.num_instances)
