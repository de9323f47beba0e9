"""Running under ``torchrun``: the one reader of its environment, the one process group, the few collectives.

featx does not launch processes itself: ``torchrun`` (or Slurm's ``srun`` with torchrun's rendezvous) starts one
process per GPU and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :meth:`TorchrunEnv.detect` reads them. A
plain ``python -m featx …`` sees none of them and runs as a world of one, with no process group at all.

Extraction and fine-tuning both start their process group with :func:`process_group`, a context manager
that joins a group the caller already made (and leaves it alone) or starts one and destroys it on exit.
Each group it starts rendezvouses under its own prefix of torchrun's store, so a process can start a
group again after destroying one (re-using the store's default keys would hang on the old group's
addresses): a script may extract or fine-tune several times under one ``torchrun``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "BARRIER_TIMEOUT",
    "TorchrunEnv",
    "World",
    "barrier",
    "close",
    "env_rank",
    "gather_objects",
    "init",
    "process_group",
    "sum_floats",
]

log = logging.getLogger(__name__)

#: How long a rank of a sharded extraction waits at a barrier for the slowest rank. Ranks that crash are
#: stopped by torchrun at once; this only bounds the wait for ranks that are alive but slower (a bigger or
#: slower shard).
BARRIER_TIMEOUT = _dt.timedelta(hours=72)

_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# Groups started by this process, so that each rendezvouses under a prefix of its own (the same sequence
# on every rank, since every rank makes the same calls).
_generation = itertools.count()


# ------------------------------------------------------------------------------------- environment
@dataclass(frozen=True)
class TorchrunEnv:
    """The rank layout that ``torchrun`` (or any launcher setting its variables) gives this process."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def detect(cls, environ: Mapping[str, str] | None = None, *, command: str = "extract") -> TorchrunEnv | None:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``None`` when not launched that way.

        Parameters
        ----------
        environ : mapping, optional
            The environment to read; ``os.environ`` by default.
        command : str, default="extract"
            The featx command the error messages show in their torchrun example.

        Raises
        ------
        ValueError
            The variables are only partly set, or not integers, or ``RANK`` is outside the world.
        """
        env = os.environ if environ is None else environ
        present = [name for name in _NAMES if env.get(name, "") != ""]
        if not present:
            return None
        if len(present) < len(_NAMES):
            missing = ", ".join(name for name in _NAMES if name not in present)
            alone = (
                "use --shard INDEX/COUNT without torchrun, or pass --no-distributed to ignore these variables"
                if command == "extract"
                else "or unset these variables to run as one process"
            )
            raise ValueError(
                f"the torchrun environment is incomplete ({missing} not set); launch with "
                f"`torchrun --nproc-per-node N -m featx {command} ...`, {alone}"
            )
        try:
            rank, world, local = (int(env[name]) for name in _NAMES)
        except ValueError:
            raise ValueError(
                f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {[env[n] for n in _NAMES]}; "
                "launch featx with torchrun"
            ) from None
        if not 0 <= rank < world:
            raise ValueError(f"RANK {rank} is not in [0, WORLD_SIZE={world})")
        return cls(rank, world, local)

    def device(self, requested: str) -> str:
        """This rank's device: ``cuda:LOCAL_RANK`` for ``auto`` or ``cuda`` where CUDA is available, else as asked."""
        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested


def env_rank() -> int:
    """This process's rank from the environment (0 outside torchrun); cheap, no process group needed."""
    raw = os.environ.get("RANK", "")
    try:
        return int(raw) if raw else 0
    except ValueError:
        raise ValueError(f"environment variable RANK={raw!r} is not an integer; launch featx with torchrun") from None


# ------------------------------------------------------------------------------------ process group
@dataclass(frozen=True)
class World:
    """Where this process stands: ``size`` processes in all, this one is ``rank`` (``local_rank`` on its node)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False  # this module started the process group, so it tears it down

    @property
    def distributed(self) -> bool:
        """More than one process: the collectives below talk to the others."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs progress."""
        return self.rank == 0


def _start(env: TorchrunEnv, device_type: str, timeout: _dt.timedelta | None) -> World:
    """Join the process group that exists, or start one for ``env`` (NCCL on CUDA, gloo elsewhere)."""
    if not dist.is_available():
        raise RuntimeError(
            "this PyTorch build has no torch.distributed; run without torchrun (extraction: --shard INDEX/COUNT "
            "per process)"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        if env.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this node; "
                "set --nproc-per-node to at most the number of GPUs"
            )
        torch.cuda.set_device(env.local_rank)
    if dist.is_initialized():  # the caller made it: use it as it is, and leave it for the caller to destroy
        if dist.get_world_size() != env.world_size:
            raise RuntimeError(
                f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is {env.world_size}"
            )
        return World(env.world_size, dist.get_rank(), env.local_rank, owns_group=False)
    wait = timeout if timeout is not None else dist.default_pg_timeout
    store, rank, size = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size, timeout=wait))
    store.set_timeout(wait)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"featx/{next(_generation)}", store),
        rank=rank,
        world_size=size,
        timeout=timeout,
        device_id=torch.device("cuda", env.local_rank) if backend == "nccl" else None,
    )
    world = World(dist.get_world_size(), dist.get_rank(), env.local_rank, owns_group=True)
    log.debug("rank %d of %d started a %s process group", world.rank, world.size, backend)
    return world


def _stop(world: World) -> None:
    if world.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(
    env: TorchrunEnv, device_type: str = "cpu", *, timeout: _dt.timedelta | None = None
) -> Iterator[World]:
    """The process group of a torchrun job, for the length of the block.

    Joins the group that already exists (a caller made it; it is left as it is), or starts one (NCCL when
    ``device_type`` is ``cuda``, on ``cuda:LOCAL_RANK``; gloo otherwise) that is destroyed on leaving.

    Parameters
    ----------
    env : TorchrunEnv
        This process's place, from :meth:`TorchrunEnv.detect`.
    device_type : str, default="cpu"
        The type of the device this rank computes on.
    timeout : datetime.timedelta, optional
        How long collectives wait for the slowest rank; PyTorch's default when not given.

    Yields
    ------
    World
    """
    world = _start(env, device_type, timeout)
    try:
        yield world
    finally:
        _stop(world)


def init(device: str = "auto") -> tuple[World, torch.device]:
    """Join the process group torchrun set up (if any) and pick this rank's device; undo with :func:`close`.

    Under torchrun with CUDA, rank ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo. Outside
    torchrun (or with ``WORLD_SIZE=1``) a world of one with no process group. A process group that already
    exists (the caller made one) is used as it is and left for the caller to destroy.
    """
    from featx._runtime.device import resolve_device

    env = TorchrunEnv.detect(command="finetune")
    if env is None or env.world_size <= 1:
        if not (dist.is_available() and dist.is_initialized()):
            return World(), resolve_device(device)
        if env is None:
            raise RuntimeError(
                "a process group exists but RANK, WORLD_SIZE and LOCAL_RANK are not set: start distributed runs "
                "with torchrun (torchrun --nproc-per-node N -m featx finetune …), which sets all three"
            )
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", env.local_rank)
    elif dev.type == "mps":
        raise ValueError("distributed fine-tuning runs on CUDA (NCCL) or the CPU (gloo), not MPS; use --device cpu")
    world = _start(env, dev.type, None)
    log.debug("rank %d of %d on %s (%s)", world.rank, world.size, dev, dist.get_backend())
    return world, dev


def close(world: World) -> None:
    """Destroy the process group if :func:`init` started it."""
    _stop(world)


# -------------------------------------------------------------------------------------- collectives
def barrier(world: World) -> None:
    """Wait for every rank (nothing to wait for in a world of one)."""
    if world.distributed:
        dist.barrier()


def gather_objects(world: World, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a list of one outside torchrun); a barrier as well."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def sum_floats(world: World, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64, so counts stay exact)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()
