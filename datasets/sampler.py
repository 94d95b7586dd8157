"""Identity sampler: P identities x K captions per (global) batch (IRRA's RandomIdentitySampler).

Its randomness comes from ``seed + epoch`` (``set_epoch``), so every DDP rank builds the same
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
        self.length = sum(max(len(v), num_instances) // num_instances * num_instances
                          for v in self.index_dic.values()) // world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> list[int]:
        rng = random.Random(self.seed + self.epoch)
        chunks: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            idxs = list(self.index_dic[pid])
            if len(idxs) < self.num_instances:
                idxs = rng.choices(idxs, k=self.num_instances)
            rng.shuffle(idxs)
            usable = len(idxs) // self.num_instances * self.num_instances
            chunks[pid] = [idxs[i:i + self.num_instances] for i in range(0, usable, self.num_instances)]
        available = [pid for pid in self.pids if chunks[pid]]
        order: list[int] = []
        while len(available) >= self.num_pids_per_batch:
            for pid in rng.sample(available, self.num_pids_per_batch):
                order.extend(chunks[pid].pop(0))
                if not chunks[pid]:
                    available.remove(pid)
        return order

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        local = self.batch_size // self.world_size
        start = self.rank * local
        return iter([i for b in range(0, len(order), self.batch_size)
                     for i in order[b + start:b + start + local]])

    def __len__(self) -> int:
        return self.length
