"""Where a run executes: the device, bf16 autocast, ``torchrun`` process groups, and ``NAME=VALUE`` options.

Shared by training, evaluation, the tasks and the benchmarks; nothing here knows about models or data.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import torch


def resolve_device(name) -> torch.device:
    """``"auto"`` -> cuda if available, else cpu; any other name is checked (cuda without CUDA is an error)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available; pass --device cpu")
    return dev


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on GPU (``dtype`` auto or bfloat16); nothing on CPU unless bfloat16 is asked for."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local, world), device


def parse_options(items) -> dict:
    """``["p=15", "offset_rows=3"]`` -> ``{"p": 15, "offset_rows": 3}`` (values parsed as JSON when they can be)."""
    out = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if k in out:
            raise ValueError(f"{k} is given twice ({k}={json.dumps(out[k])} and {item}); give it once")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
