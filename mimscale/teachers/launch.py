"""One process per device for the teacher tools (``teacher fit-kmeans``, ``data add-targets``).

They run under the same launchers as training (``torchrun``, ``srun``, ``deepspeed``, ``mpirun``, ...):
:func:`start` reads the launch through :mod:`mimscale.dist`, picks this rank's device and, with more than one
rank, creates the default process group (NCCL on CUDA, gloo on CPU) unless one exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as tdist

from .. import dist
from ..errors import ConfigError


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA if present, else CPU) | ``cpu`` | ``cuda`` (this rank's GPU) | ``cuda:N``."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        name = dist.accelerator_name()
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} asked for CUDA, but no CUDA device is available here")
        if dev.index is None:  # this rank's GPU, by the rule every entry point uses (dist.bind_device)
            dev = torch.device("cuda", dist.device_ordinal(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r}: only cpu and cuda are supported")
    return dev


@contextmanager
def launched(device: str | None = "auto") -> Iterator[tuple[dist.DistEnv, torch.device]]:
    """``with launched(device) as (d, dev):`` this rank's launch, device and (if needed) process group."""
    d = dist.detect()
    dist.export(d)
    torch.set_num_threads(dist.configure_threads(d))
    dev = resolve_device(device, d.local_rank)
    own = d.world_size > 1 and not tdist.is_initialized()
    if own:
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield d, dev
    finally:
        if own and tdist.is_initialized():
            tdist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op on one rank); returns it."""
    if world()[1] > 1:
        tdist.all_reduce(t)
    return t


def all_gather_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t [n_r, ...]`` (``n_r`` may differ by rank), in rank order."""
    _, w = world()
    if w == 1:
        return [t]
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(w)]
    tdist.all_gather(sizes, n)
    width = int(max(int(s) for s in sizes))
    padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(w)]
    tdist.all_gather(out, padded)
    return [o[: int(s)] for o, s in zip(out, sizes)]


def barrier() -> None:
    if world()[1] > 1:
        tdist.barrier()
