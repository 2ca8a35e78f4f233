"""torch.distributed as launchers set it up: ``torchrun`` and ``accelerate launch`` export
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every
process, and :func:`setup` joins the process group from them (gloo on CPU, nccl on CUDA).
Without them a run is a single process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from peftlab import devices


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(choice: str, local_rank: int = 0, *, launched: bool = False) -> torch.device:
    """This process's device for ``--device choice`` (see :mod:`peftlab.devices`); under a
    launcher (``launched``) ``cuda`` / ``auto`` mean the process's own GPU, ``cuda:LOCAL_RANK``."""
    return devices.resolve_device(choice, local_rank=local_rank if launched else None)


def setup(device_choice: str = "auto") -> Dist:
    """Join the launcher's process group (when ``WORLD_SIZE`` > 1) and pick this process's device."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_choice, local_rank, launched=world_size > 1)
    if world_size <= 1:
        return Dist(0, 1, 0, device)
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run a single process")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(
                f"WORLD_SIZE={world_size} but {name} is not set; start the processes with torchrun "
                "or accelerate launch, which set it"
            )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


def teardown(info: Dist) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(info: Dist) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def gather_to_main(info: Dist, obj: Any) -> list[Any]:
    """Every process's ``obj`` on rank 0 (in rank order); other ranks get an empty list."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size if info.is_main else []
    dist.gather_object(obj, out if info.is_main else None, dst=0)
    return out
