"""Identity sampler: P identities x K captions per batch (IRRA's RandomIdentitySampler)."""
from __future__ import annotations

import copy
import random
from collections import defaultdict
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from utils.errors import ConfigError


class RandomIdentitySampler(Sampler[int]):
    """Each epoch: shuffle every identity's samples (drawing K with replacement when it has fewer),
    cut them into chunks of K, then repeatedly pick P = batch_size // K distinct identities that
    still have chunks and emit one chunk of each."""

    def __init__(self, pids: list[int], batch_size: int, num_instances: int):
        if batch_size < num_instances or batch_size % num_instances:
            raise ConfigError(f"batch_size {batch_size} must be a multiple of num_instance {num_instances}")
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.index_dic: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            self.index_dic[pid].append(index)
        self.pids = list(self.index_dic)
        if len(self.pids) < self.num_pids_per_batch:
            raise ConfigError(f"identity sampler needs {self.num_pids_per_batch} identities per batch, "
                             f"the data has {len(self.pids)}")
        self.length = sum(max(len(v), num_instances) // num_instances * num_instances
                          for v in self.index_dic.values())

    def __iter__(self) -> Iterator[int]:
        chunks: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            idxs = copy.deepcopy(self.index_dic[pid])
            if len(idxs) < self.num_instances:
                idxs = list(np.random.choice(idxs, size=self.num_instances, replace=True))
            random.shuffle(idxs)
            usable = len(idxs) // self.num_instances * self.num_instances
            chunks[pid] = [idxs[i:i + self.num_instances] for i in range(0, usable, self.num_instances)]
        available = [pid for pid in self.pids if chunks[pid]]
        order: list[int] = []
        while len(available) >= self.num_pids_per_batch:
            for pid in random.sample(available, self.num_pids_per_batch):
                order.extend(int(i) for i in chunks[pid].pop(0))
                if not chunks[pid]:
                    available.remove(pid)
        return iter(order)

    def __len__(self) -> int:
        return self.length
