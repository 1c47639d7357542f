"""Thin helpers over torch.distributed (torchrun sets the environment; nothing here launches processes)."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as tdist


def is_dist() -> bool:
    """Whether a process group is initialised."""
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


def shutdown() -> None:
    """Destroy the process group, if any (end of a torchrun process; a no-op otherwise)."""
    if is_dist():
        tdist.destroy_process_group()


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


def global_num_boxes(local: int | float, device: torch.device) -> float:
    """This process's share of DETR's box-count normaliser (Carion et al., ECCV 2020, Sec. 3.1 and their
    ``SetCriterion``): ``max(N, 1) / world_size``, with ``N`` the number of target boxes summed over processes.

    DDP averages gradients over the W processes, so the per-process losses ``sum_local / (max(N, 1) / W)``
    average to the single-process loss of the whole batch ``sum_all / max(N, 1)``, gradients included, for any
    split of the boxes over processes (tests/test_distributed.py). DETR's own code clamps after dividing,
    ``max(N / W, 1)``, which is W times too small a gradient when ``0 < N < W``."""
    n = torch.tensor(float(local), dtype=torch.float64, device=device)
    if is_dist():
        tdist.all_reduce(n)
    return max(float(n), 1.0) / world_size()


def all_reduce_sum(local: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``local`` summed over processes (one collective; identity with one process)."""
    t = local.detach()
    if not is_dist():
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process (``[obj]`` with one process)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def global_normalizer(local: torch.Tensor, minimum: float | None = None) -> torch.Tensor:
    """The distributed form of a loss normaliser ``Z`` summed over the batch (e.g. cross-entropy's weighted
    query count): ``Z_all / world_size``, detached, with ``Z_all`` the sum over processes (clamped below at
    ``minimum`` when given). Dividing each process's summed loss by it makes DDP's gradient average equal
    the single-process ``sum_all / Z_all``; dividing by the local ``Z`` instead does not when the processes'
    ``Z`` differ. Identity (up to the clamp) with one process."""
    z = all_reduce_sum(local)
    if minimum is not None:
        z = z.clamp_min(minimum)
    return z / world_size() if is_dist() else z
