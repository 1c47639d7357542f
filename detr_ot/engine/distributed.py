"""Thin helpers over torch.distributed (torchrun sets the environment; nothing here launches processes)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as tdist


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> torch.device:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1): NCCL on CUDA, gloo on
    CPU, the CUDA device from ``LOCAL_RANK``, a generous timeout for long evaluations. Returns the device."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not is_dist():
        tdist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60)
        )
    return dev


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over processes (one collective for the whole dict)."""
    if not is_dist() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def global_num_boxes(local: int, device: torch.device) -> float:
    """DETR's box-count normaliser: the number of target boxes averaged over processes, at least 1."""
    n = torch.tensor(float(local), device=device)
    if is_dist():
        tdist.all_reduce(n)
        n = n / world_size()
    return max(float(n), 1.0)
