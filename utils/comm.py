"""Process group helpers: rank, world size, barriers and all-gather with gradients.

Started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment): NCCL on GPUs,
gloo on CPU. Without it everything degrades to a single process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device_name: str) -> torch.device:
    """Join the process group when launched by torchrun; returns this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if world_size > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if device_name in ("auto", "cuda") else torch.device(device_name)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def end_distributed(wait: bool) -> None:
    """Leave the process group (if any) before the process exits: after every rank is done when
    ``wait``, at once after an error. A gloo group torn down at interpreter exit, while another rank
    still writes, can abort the process ("terminate called without an active exception")."""
    if not is_distributed():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's ``tensor`` (rank order); gradients flow back to each rank's part.

    Each rank then computes the loss of the whole global batch; the backward pass sums the
    gradient that every rank's copy of the loss sends to a part, and DDP's gradient averaging
    divides by the world size, so the gradients equal those of one process on the global batch.
    """
    if not is_distributed():
        return tensor
    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """``flag`` and-ed over all ranks (so that every rank takes the same branch)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (dim 0, any number per rank) concatenated in rank order, on ``tensor``'s
    device; the other dimensions and the dtype must agree."""
    if not is_distributed():
        return tensor
    device = _comm_device()
    local = tensor.to(device)
    counts = all_gather_no_grad(torch.tensor([len(local)], device=device)).tolist()
    if not max(counts):
        return tensor
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[:len(local)] = local
    parts = all_gather_no_grad(padded).split(max(counts))
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(tensor.device)


def broadcast_tensor(tensor: torch.Tensor | None, src: int, like_device: torch.device) -> torch.Tensor:
    """``tensor`` of rank ``src`` on every rank (others pass None), placed on ``like_device``."""
    if not is_distributed():
        return tensor.to(like_device)
    shape, dtype = broadcast_object((tuple(tensor.shape), tensor.dtype) if get_rank() == src else None, src)
    device = _comm_device()
    buffer = tensor.to(device) if get_rank() == src else torch.empty(shape, dtype=dtype, device=device)
    if buffer.numel():
        dist.broadcast(buffer, src=src)
    return buffer.to(like_device)


def broadcast_object(obj, src: int):
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_range(low: float, high: float) -> tuple[float, float]:
    """(min of ``low``, max of ``high``) over all ranks."""
    if not is_distributed():
        return low, high
    device = _comm_device()
    values = torch.tensor([low, -high], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return float(values[0]), -float(values[1])


def all_reduce_sum(value: int, device: torch.device) -> int:
    """``value`` summed over all ranks."""
    if not is_distributed():
        return value
    total = torch.tensor([value], device=device)
    dist.all_reduce(total)
    return int(total.item())


def all_gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
