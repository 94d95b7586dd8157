"""Run by tests/test_distributed.py under torchrun: one DDP step of a tiny model (the heads of argv[2],
default LOSS_NAMES) on this rank's half of a fixed global batch; rank 0 saves the losses and the
(DDP-averaged) gradients."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model.build import build_model  # noqa: E402
from utils.comm import get_rank, get_world_size, init_distributed  # noqa: E402
from ddp_reference import LOSS_NAMES, fixed_batch, fixed_patch_order, tiny_config  # noqa: E402


def main(out_path: str, loss_names: str = LOSS_NAMES) -> None:
    init_distributed("cpu")
    rank, world = get_rank(), get_world_size()
    torch.manual_seed(0)
    model = build_model(tiny_config(loss_names), num_classes=6)
    fixed_patch_order(model)
    batch = fixed_batch()
    local = {k: v.chunk(world)[rank] for k, v in batch.items()}
    ddp = DistributedDataParallel(model)
    outputs = ddp(local)
    total = sum(v for k, v in outputs.items() if k.endswith("_loss"))
    total.backward()
    if rank == 0:
        torch.save({"losses": {k: v.detach() for k, v in outputs.items()},
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                    "loss_names": LOSS_NAMES}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
