"""Several processes under ``torchrun``: joining the process group, and the collectives the stages use.

``torchrun --nproc-per-node N -m perfit_probe.cli cache|fit ...`` starts N processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`torchrun` reads them,
joins a gloo (CPU) or nccl (CUDA) process group and leaves it at the end; in one process
(no ``WORLD_SIZE``, or 1) it does nothing. The stages then split their work by ``rank``
(``perfit_probe.stages.cache``, ``perfit_probe.stages.fit``) and meet at :func:`barrier`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

from perfit_probe.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``torchrun`` processes."""

    rank: int
    """Index of this process, 0 .. ``world_size - 1`` (0 writes the run directory)."""
    world_size: int
    """Number of processes (1: no ``torchrun``)."""
    device: str
    """Device this process computes on: ``cuda:LOCAL_RANK`` for a CUDA run under ``torchrun``,
    else the device asked for."""


@contextmanager
def torchrun(device: str, environ: Mapping[str, str] | None = None) -> Iterator[Ranks]:
    """Join the ``torchrun`` process group described by ``environ`` (default ``os.environ``).

    With ``WORLD_SIZE`` > 1, a CUDA ``device`` (``cuda``, ``cuda:N``, or ``auto`` with CUDA
    available) becomes ``cuda:LOCAL_RANK`` and the group uses nccl, otherwise gloo; the group
    is destroyed when the block ends, also on an error.
    """
    env = os.environ if environ is None else environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    if world_size > 1:
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            device = f"cuda:{int(env.get('LOCAL_RANK', '0'))}"
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield Ranks(rank, world_size, device)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def check_initialised(world_size: int) -> None:
    """``ConfigError`` when ``world_size`` > 1 but no process group is up."""
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("world_size > 1 needs torch.distributed initialised (run under torchrun)")


def barrier(world_size: int) -> None:
    """Wait for every process (nothing to wait for in one process)."""
    if world_size > 1:
        dist.barrier()
