"""Running under ``torchrun``: the process group, the rank's device, and the few collectives fine-tuning needs.

featx does not launch processes itself: ``torchrun`` (or Slurm's ``srun`` with torchrun's rendezvous) starts one
process per GPU and sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init` reads them. A plain
``python -m featx …`` sees none of them and runs as a world of one, with no process group at all.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "BARRIER_TIMEOUT",
    "ProcessGroup",
    "TorchrunEnv",
    "World",
    "barrier",
    "broadcast_object",
    "close",
    "env_rank",
    "gather_objects",
    "init",
    "sum_floats",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """Where this process stands: ``size`` processes in all, this one is ``rank`` (``local_rank`` on its node)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group, so it tears it down

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs progress."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; launch featx with torchrun") from None


def env_rank() -> int:
    """This process's rank from the environment (0 outside torchrun); cheap, no process group needed."""
    return _env_int("RANK") or 0


def init(device: str = "auto") -> tuple[World, torch.device]:
    """Join the process group torchrun set up (if any) and pick this rank's device.

    Under torchrun with CUDA, rank ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo. A process
    group that already exists (the caller made one) is used as it is and left for the caller to destroy.
    """
    from featx._runtime.device import resolve_device

    size = _env_int("WORLD_SIZE") or 1
    if size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return World(), resolve_device(device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run without torchrun")
    rank = _env_int("RANK") if _env_int("RANK") is not None else dist.get_rank() if dist.is_initialized() else None
    local_rank = _env_int("LOCAL_RANK")
    if rank is None or local_rank is None:
        raise RuntimeError(
            f"WORLD_SIZE={size} is set but RANK or LOCAL_RANK is not: start distributed runs with torchrun "
            "(torchrun --nproc-per-node N -m featx finetune …), which sets all three"
        )
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this node; "
                "set --nproc-per-node to at most the number of GPUs"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type == "mps":
        raise ValueError("distributed fine-tuning runs on CUDA (NCCL) or the CPU (gloo), not MPS; use --device cpu")
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        owns = True
    world = World(dist.get_world_size(), dist.get_rank(), local_rank, owns)
    log.debug("rank %d of %d on %s (%s)", world.rank, world.size, dev, dist.get_backend())
    return world, dev


def close(world: World) -> None:
    """Destroy the process group if :func:`init` created it."""
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather_objects(world: World, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a list of one outside torchrun)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(world: World, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_floats(world: World, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64, so counts stay exact)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


#: How long a rank waits at a barrier for the slowest rank. Ranks that crash are stopped by torchrun at
#: once; this only bounds the wait for ranks that are alive but slower (a bigger or slower shard).
BARRIER_TIMEOUT = _dt.timedelta(hours=72)


# ------------------------------------------------------------------------------------------ torchrun
@dataclass(frozen=True)
class TorchrunEnv:
    """The rank layout that ``torchrun`` (or any launcher setting its variables) gives this process."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def detect(cls, environ: dict[str, str] | None = None) -> TorchrunEnv | None:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``None`` when not launched that way.

        Raises
        ------
        ValueError
            The variables are only partly set, or not integers.
        """
        env = os.environ if environ is None else environ
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        present = [name for name in names if env.get(name, "") != ""]
        if not present:
            return None
        if len(present) < len(names):
            missing = ", ".join(name for name in names if name not in present)
            raise ValueError(
                f"the torchrun environment is incomplete ({missing} not set); launch with "
                "`torchrun --nproc-per-node N -m featx extract ...`, use --shard INDEX/COUNT without torchrun, "
                "or pass --no-distributed to ignore these variables"
            )
        try:
            rank, world, local = (int(env[name]) for name in names)
        except ValueError:
            raise ValueError(
                f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {[env[n] for n in names]}"
            ) from None
        if not 0 <= rank < world:
            raise ValueError(f"RANK {rank} is not in [0, WORLD_SIZE={world})")
        return cls(rank, world, local)

    def device(self, requested: str) -> str:
        """This rank's device: ``cuda:LOCAL_RANK`` for ``auto`` or ``cuda`` where CUDA is available, else as asked."""
        import torch

        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested


class ProcessGroup:
    """Barriers and small all-gathers over ``torch.distributed`` (gloo on CPU, nccl on CUDA).

    Joins a process group the launcher already initialised, or initialises one from torchrun's
    environment (``MASTER_ADDR``/``MASTER_PORT``) that lives until the process exits: re-initialising a
    group after destroying it hangs under torchrun's agent store, and a script may extract several times.
    """

    def __init__(self, env: TorchrunEnv, device_type: str, timeout: _dt.timedelta = BARRIER_TIMEOUT) -> None:
        self.env = env
        self.backend = "nccl" if device_type == "cuda" else "gloo"
        self.timeout = timeout

    def __enter__(self) -> ProcessGroup:
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("this PyTorch build has no torch.distributed; use --shard INDEX/COUNT per process")
        if self.backend == "nccl":
            torch.cuda.set_device(self.env.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(self.backend, timeout=self.timeout)
            atexit.register(_destroy_group)
        elif self.env.world_size != dist.get_world_size():
            raise RuntimeError(
                f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is {self.env.world_size}"
            )
        return self

    def __exit__(self, *exc) -> None:
        pass

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a barrier as well)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
