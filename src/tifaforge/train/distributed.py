"""Data parallelism for the stages that are not TRL trainers (MGRPO): the process group, and the few
collectives an update needs, on torch.distributed (gloo on CPU, NCCL on CUDA).

    tifa train mgrpo configs/tiny.yaml --launcher torchrun --num-processes 2

The launcher (torchrun, `accelerate launch`) sets RANK / WORLD_SIZE / MASTER_ADDR; one process is a
world of one and every function here is then a no-op, so single-process code paths stay as they were.
A rank that dies makes the launcher stop the others (torchrun tears the whole group down).
"""

from __future__ import annotations

import os
from datetime import timedelta


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def start(device: str = "cpu", timeout_s: float = 1800) -> None:
    """Join the launcher's process group (once); nothing to do in a single process."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or active():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))


def _device():
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True when the flag is set on any rank (a step skipped anywhere is skipped everywhere)."""
    import torch
    import torch.distributed as dist

    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_all(values: list[float]) -> list[float]:
    """Each value summed over the ranks (counts and partial sums: tokens, sequences, losses)."""
    import torch
    import torch.distributed as dist

    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (small Python objects: rows, counts)."""
    import torch.distributed as dist

    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_gradients(params, bucket: int = 2**25) -> None:
    """Sum the gradients over the ranks, in place, one all-reduce per bucket of about `bucket` numbers.

    Why not DistributedDataParallel: its reducer needs every rank to run the same number of backward
    passes, and MGRPO's ranks hold different numbers of rows once zero-spread groups are dropped. Each
    rank's loss is already normalised by the global counts, so the sum over ranks is the one-process
    gradient. A parameter with a gradient on some rank gets zeros where it has none; one with none on
    any rank keeps None (AdamW skips it, as in one process)."""
    import torch
    import torch.distributed as dist

    if not active():
        return
    params = [p for p in params if p.requires_grad]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_device())
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    params = [p for p, h in zip(params, has.tolist()) if h]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    start = 0
    while start < len(params):
        end, size = start, 0
        while end < len(params) and (size == 0 or size + params[end].numel() <= bucket):
            size += params[end].numel()
            end += 1
        group = params[start:end]
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        start = end
