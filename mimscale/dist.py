"""The ONLY module that reads launcher environment variables.

Supported launches: ``torchrun``, the ``deepspeed`` launcher, ``accelerate launch``, ``srun`` (SLURM_*
variables), plain ``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT``, ``mpirun`` (OMPI_*), and a single
process with no launcher. :func:`detect` turns any of them into a :class:`DistEnv`; :func:`export` writes
the canonical variables back so that ``torch.distributed`` / DeepSpeed initialise through ``env://``.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from .errors import LaunchError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # none | torchrun | deepspeed | accelerate | slurm | mpi | env

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:  # the list form is a compressed range ("n[1-4]"); scontrol expands it
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return _first_host(nodelist)


def _first_host(nodelist: str) -> str:
    """First host of a Slurm hostlist without scontrol: ``gpu[07,09-12],cpu1`` -> ``gpu07``."""
    depth = 0
    for i, ch in enumerate(nodelist):  # cut at the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    if "[" not in nodelist:
        return nodelist
    prefix, rest = nodelist.split("[", 1)
    ranges, _, suffix = rest.partition("]")
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _launcher(env: Mapping[str, str]) -> str:
    if any(k.startswith("ACCELERATE_") for k in env) and "RANK" in env:
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env or "DEEPSPEED_LAUNCHER" in env:
        return "deepspeed"
    if "RANK" in env:
        return "env"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and env.get("SLURM_STEP_ID") is not None:
        return "slurm"
    if "OMPI_COMM_WORLD_RANK" in env:
        return "mpi"
    return "none"


def detect(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launch environment; inconsistent values raise LaunchError with one line."""
    env = os.environ if env is None else env
    kind = _launcher(env)
    if kind in ("accelerate", "torchrun", "deepspeed", "env"):
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = (
            _int(env, "LOCAL_WORLD_SIZE")
            if "LOCAL_WORLD_SIZE" in env
            else _int(env, "LOCAL_SIZE")
            if "LOCAL_SIZE" in env
            else world
        )
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
    elif kind == "slurm":
        rank, world, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID")
        local_world = (
            _int(env, "SLURM_NTASKS_PER_NODE")
            if env.get("SLURM_NTASKS_PER_NODE", "").isdigit()
            else world // max(1, _int(env, "SLURM_NNODES"))
            if "SLURM_NNODES" in env
            else world
        )
        addr = env.get("MASTER_ADDR") or _slurm_master(env)
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + _int(env, "SLURM_JOB_ID") % 10000
    elif kind == "mpi":
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
    else:
        rank, world, local, local_world = 0, 1, 0, 1
        addr, port = "127.0.0.1", _free_port()
    if world < 1:
        raise LaunchError(f"world size {world} must be >= 1 (launcher: {kind})")
    if not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is outside the world size {world} (launcher: {kind})")
    if not 0 <= local < max(local_world, 1) or local_world > world:
        raise LaunchError(f"local rank {local} / local world size {local_world} do not fit world size {world}")
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a valid port")
    return DistEnv(rank, world, local, local_world, addr, port, kind)


def export(d: DistEnv) -> None:
    """Write the canonical variables so torch.distributed and DeepSpeed init through env://.

    Also pins DeepSpeed's accelerator to the CPU on machines without CUDA (its auto-detection warns).
    """
    if "DS_ACCELERATOR" not in os.environ and accelerator_name() == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(
        RANK=str(d.rank),
        WORLD_SIZE=str(d.world_size),
        LOCAL_RANK=str(d.local_rank),
        LOCAL_WORLD_SIZE=str(d.local_world_size),
        MASTER_ADDR=d.master_addr,
        MASTER_PORT=str(d.master_port),
    )


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` that the deepspeed launcher appends."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(a)
    return out


def accelerator_name(cuda_available: bool | None = None) -> str:
    """'cuda' on GPU nodes, 'cpu' otherwise (the same code path decides both)."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "cuda" if cuda_available else "cpu"


def device_ordinal(local_rank: int, device_count: int) -> int:
    """The GPU ordinal of a rank: ``local_rank % device_count``. One rule for both ways clusters bind GPUs:
    every task sees all of the node's GPUs (``--gpus-per-node``: ordinal = local rank), or each task sees only
    its own (``--gpus-per-task`` / ``--gpu-bind`` / cgroups: ``device_count`` 1, ordinal 0)."""
    if device_count < 1:
        raise LaunchError("CUDA is available but reports no devices (check CUDA_VISIBLE_DEVICES)")
    return local_rank % device_count


def bind_device(d: DistEnv, accelerator: str | None = None, env: MutableMapping[str, str] | None = None):
    """This rank's device, made current BEFORE any process group or engine exists; every entry point calls it.

    On CUDA: ``torch.cuda.set_device(device_ordinal(...))``, and where the ordinal differs from the local rank
    (one GPU visible per task) ``LOCAL_RANK`` is exported as the ordinal: DeepSpeed (engine, ``zero.Init``,
    the NCCL ``device_id``) and accelerate read ``LOCAL_RANK`` as the device ordinal and would otherwise ask
    for a device the task cannot see ("invalid device ordinal"). Returns ``torch.device("cuda", ordinal)``, or
    ``torch.device("cpu")`` on CPU nodes."""
    import torch

    env = os.environ if env is None else env
    accelerator = accelerator or accelerator_name()
    if accelerator != "cuda":
        return torch.device("cpu")
    ordinal = device_ordinal(d.local_rank, torch.cuda.device_count())
    torch.cuda.set_device(ordinal)
    if ordinal != d.local_rank:
        env["LOCAL_RANK"] = str(ordinal)
    return torch.device("cuda", ordinal)


def configure_threads(d: DistEnv, cpus: int | None = None, env: MutableMapping[str, str] | None = None) -> int:
    """Keep ranks x OpenMP threads <= cores on a node unless the user set OMP_NUM_THREADS."""
    env = os.environ if env is None else env
    if "OMP_NUM_THREADS" in env:
        return int(env["OMP_NUM_THREADS"])
    cpus = cpus or len(os.sched_getaffinity(0))
    n = max(1, cpus // max(1, d.local_world_size))
    env["OMP_NUM_THREADS"] = str(n)
    return n


# NCCL / torch-NCCL settings applied on CUDA nodes unless the user (or the cluster's module system)
# already set them: a failed or timed-out collective tears the process down, so torchrun / srun see
# the failure instead of every rank hanging until the job's wall-clock limit; NCCL prints its
# warnings (e.g. "falling back to sockets" when InfiniBand is not found) without the INFO flood.
NCCL_ENV_DEFAULTS: dict[str, str] = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
}


def nccl_env_defaults(
    env: MutableMapping[str, str] | None = None, cuda_available: bool | None = None
) -> dict[str, str]:
    """Set :data:`NCCL_ENV_DEFAULTS` in ``env`` (default ``os.environ``) where unset, on CUDA only.

    Returns what was set (``{}`` on CPU nodes, where the backend is gloo and NCCL is never loaded).
    Call before the process group is created (before ``deepspeed.initialize``).
    """
    env = os.environ if env is None else env
    if accelerator_name(cuda_available) != "cuda":
        return {}
    added = {k: v for k, v in NCCL_ENV_DEFAULTS.items() if k not in env}
    env.update(added)
    return added
