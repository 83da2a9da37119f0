"""The one module that touches ``torch.distributed``.

``init()`` reads the environment of whichever launcher started the process and returns where this
process sits:

* ``torchrun`` and the ``deepspeed`` launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``;
* ``srun`` (one task per GPU): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR`` and
  ``MASTER_PORT`` must be exported by the batch script (see slurm/);
* nothing: a single process (rank 0 of 1) on a free local port.

NCCL on CUDA, gloo on CPU. Model and data code get rank/world size from the returned ``DistInfo``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun/deepspeed or Slurm variables; (0, 1, 0) otherwise."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init(timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group (idempotent) and pick this process's device."""
    rank, world, local = launcher_env()
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, device)
    if world > 1 and "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            "MASTER_ADDR/MASTER_PORT are not set: export them in the launch script "
            "(torchrun and the deepspeed launcher set them; under srun use the first node of the job)"
        )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    # DeepSpeed reads these even when the process group already exists.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    if world == 1:  # nothing to rendezvous with: an in-memory store, so no port can be lost to a race
        store = dist.HashStore()
        dist.init_process_group(
            backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=timeout_s)
        )
    else:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, device)


def comm_op_build_pending() -> str | None:
    """On CPU, ``deepspeed.initialize`` JIT-compiles DeepSpeed's shared-memory comm op the first time on a
    machine (25-70 s with no output); the path it will build into when that is still to come, else None."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory  # where torch's JIT loader puts it

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    if deepspeed.git_version_info.installed_ops.get(builder.NAME, False):
        return None  # built into the wheel
    folder = Path(_get_build_directory(builder.NAME, verbose=False))
    return None if (folder / f"{builder.NAME}.so").is_file() else str(folder)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place, also returned); a no-op on one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_named(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Sum named numbers over ranks in one float64 all-reduce; the sums come back by name, never read by
    position. ``device``: this process's (NCCL reduces only CUDA tensors)."""
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    return dict(zip(values, all_reduce_sum(t).tolist(), strict=True))


def all_gather_object(obj):
    """Every rank's ``obj`` as a list indexed by rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """barrier + destroy: without the barrier a fast rank's exit can abort a slower one's gloo calls."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
