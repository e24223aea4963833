"""mimscale.dist: launcher detection from plain dict environments, export, threads, argv clean-up."""

from __future__ import annotations

import os

import pytest

from mimscale import dist
from mimscale.dist import DistEnv, detect
from mimscale.errors import LaunchError

# Every variable detect() may read; cleared from os.environ where a test touches the real environment.
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "CROSS_RANK",
    "CROSS_SIZE",
    "DEEPSPEED_LAUNCHER",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_STEP_ID",
    "SLURM_JOB_ID",
    "SLURM_NNODES",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
)


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k in LAUNCH_VARS or k.startswith(("ACCELERATE_", "SLURM_", "OMPI_")):
            monkeypatch.delenv(k)
    return monkeypatch


def _fields(d: DistEnv) -> tuple:
    return (d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr, d.master_port, d.launcher)


# ----------------------------------------------------------------------------- launchers


def test_no_launcher():
    d = detect({})
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.launcher) == (0, 1, 0, 1, "none")
    assert d.master_addr == "127.0.0.1"
    assert 0 < d.master_port < 65536
    assert d.is_main and d.num_nodes == 1


def test_unrelated_variables_are_no_launcher():
    d = detect({"HOME": "/root", "SLURM_JOB_ID": "77", "PATH": "/usr/bin"})  # sbatch script, not an srun step
    assert d.launcher == "none" and d.world_size == 1


def test_torchrun():
    env = {
        "TORCHELASTIC_RUN_ID": "abc",
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "node3",
        "MASTER_PORT": "29400",
        "GROUP_RANK": "1",
    }
    d = detect(env)
    assert _fields(d) == (5, 8, 1, 4, "node3", 29400, "torchrun")
    assert not d.is_main and d.num_nodes == 2


def test_deepspeed_launcher():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "2",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    d = detect(env)
    assert _fields(d) == (3, 4, 1, 2, "10.0.0.1", 29500, "deepspeed")
    assert d.num_nodes == 2


def test_accelerate():
    env = {
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "12355",
        "TORCHELASTIC_RUN_ID": "none",
    }  # accelerate launch runs torchrun underneath
    d = detect(env)
    assert _fields(d) == (0, 2, 0, 2, "127.0.0.1", 12355, "accelerate")


def test_accelerate_config_vars_alone_are_not_a_launch():
    assert detect({"ACCELERATE_MIXED_PRECISION": "bf16"}).launcher == "none"


def test_plain_env_vars_with_defaults():
    d = detect({"RANK": "2", "WORLD_SIZE": "3"})
    # no LOCAL_RANK: local = rank; no local world: = world; default address and port
    assert _fields(d) == (2, 3, 2, 3, "127.0.0.1", 29500, "env")
    d = detect({"RANK": "0"})
    assert (d.world_size, d.launcher) == (1, "env")


SLURM = {
    "SLURM_PROCID": "6",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_ID": "123456",
    "SLURM_NNODES": "2",
}


def test_slurm_with_master_addr():
    d = detect({**SLURM, "MASTER_ADDR": "gpu-07", "MASTER_PORT": "29555"})
    assert _fields(d) == (6, 8, 2, 4, "gpu-07", 29555, "slurm")
    assert d.num_nodes == 2


def test_slurm_port_from_job_id():
    d = detect({**SLURM, "MASTER_ADDR": "gpu-07"})
    assert d.master_port == 20000 + 123456 % 10000 == 23456
    # every rank of the job derives the same port, different jobs usually differ
    assert detect({**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "MASTER_ADDR": "x"}).master_port == 23456
    assert detect({**SLURM, "SLURM_JOB_ID": "123457", "MASTER_ADDR": "x"}).master_port == 23457


def test_slurm_tasks_per_node():
    d = detect({**SLURM, "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "1", "MASTER_ADDR": "x"})
    assert d.local_world_size == 4  # the explicit per-node count wins over NTASKS / NNODES
    d = detect({**SLURM, "SLURM_NTASKS_PER_NODE": "4(x2)", "MASTER_ADDR": "x"})
    assert d.local_world_size == 4  # non-numeric form: falls back to NTASKS / NNODES = 8 / 2


def test_slurm_without_master_addr_single_host():
    d = detect({**SLURM, "SLURM_JOB_NODELIST": "gpu-07"})
    assert d.master_addr == "gpu-07"
    d = detect({**SLURM, "SLURM_NODELIST": "gpu-07,gpu-08"})
    assert d.master_addr == "gpu-07"


def test_slurm_without_nodelist_is_localhost():
    assert detect(SLURM).master_addr == "127.0.0.1"


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node[01-04]", "node01"),
        ("node[07,09-12]", "node07"),
        ("gpu[3-4],cpu1", "gpu3"),
        ("a1,b[2-3]", "a1"),
        ("rack1-n[004-008]", "rack1-n004"),
    ],
)
def test_slurm_compressed_nodelist_without_scontrol(monkeypatch, tmp_path, nodelist, first):
    """Without a usable ``scontrol`` the compressed hostlist is expanded by hand to its first host
    (regression: ``node[01-04]`` used to give the non-existent host ``node``)."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no scontrol
    d = detect({**SLURM, "SLURM_JOB_NODELIST": nodelist})
    assert d.master_addr == first


def test_slurm_needs_a_step():
    """Inside the sbatch script (no srun step) the SLURM_* variables do not describe the ranks."""
    env = dict(SLURM)
    del env["SLURM_STEP_ID"]
    assert detect(env).launcher == "none"


def test_launcher_precedence_torchrun_inside_slurm():
    """torchrun started by srun: the torchrun variables describe the ranks, not SLURM_*."""
    env = {
        **SLURM,
        "TORCHELASTIC_RUN_ID": "j1",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
    }
    d = detect(env)
    assert (d.launcher, d.rank, d.world_size) == ("torchrun", 1, 2)


def test_mpi():
    env = {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "MASTER_ADDR": "head",
    }
    d = detect(env)
    assert _fields(d) == (3, 4, 1, 2, "head", 29500, "mpi")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "env,words",
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, ["rank 4", "world size 4"]),
        ({"RANK": "-1", "WORLD_SIZE": "4"}, ["rank -1"]),
        ({"RANK": "0", "WORLD_SIZE": "0"}, ["world size 0"]),
        ({**SLURM, "SLURM_PROCID": "8", "MASTER_ADDR": "x"}, ["rank 8", "world size 8", "slurm"]),
        (
            {
                "OMPI_COMM_WORLD_RANK": "2",
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
            },
            ["rank 2", "mpi"],
        ),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, ["local rank 2"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}, ["local world size 4"]),
        ({"RANK": "one", "WORLD_SIZE": "2"}, ["RANK='one'", "not an integer"]),
        ({"RANK": "0", "WORLD_SIZE": "2.0"}, ["WORLD_SIZE='2.0'", "not an integer"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": ""}, ["LOCAL_RANK=''"]),
        ({**SLURM, "SLURM_NTASKS": "eight"}, ["SLURM_NTASKS='eight'"]),
        ({**SLURM, "SLURM_JOB_ID": "123.4", "MASTER_ADDR": "x"}, ["SLURM_JOB_ID='123.4'"]),
        ({"RANK": "0", "MASTER_PORT": "http"}, ["MASTER_PORT='http'"]),
        ({"RANK": "0", "MASTER_PORT": "70000"}, ["MASTER_PORT=70000", "not a valid port"]),
        ({"RANK": "0", "MASTER_PORT": "0"}, ["MASTER_PORT=0"]),
        ({"RANK": "0", "MASTER_PORT": "-5"}, ["MASTER_PORT=-5"]),
    ],
)
def test_launch_errors(env, words):
    with pytest.raises(LaunchError) as ei:
        detect(env)
    msg = str(ei.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert "\n" not in msg


# ----------------------------------------------------------------------------- argv, export, threads


@pytest.mark.parametrize(
    "argv,out",
    [
        (["pretrain", "--local_rank=3", "train.epochs=1"], ["pretrain", "train.epochs=1"]),
        (["--local-rank=0", "pretrain"], ["pretrain"]),
        (["pretrain", "--local_rank", "2", "x=1"], ["pretrain", "x=1"]),
        (["pretrain", "--local-rank", "2"], ["pretrain"]),
        (["pretrain", "tiny_cpu", "log.run_name=--local_rank"], ["pretrain", "tiny_cpu", "log.run_name=--local_rank"]),
        ([], []),
    ],
)
def test_strip_launcher_args(argv, out):
    before = list(argv)
    assert dist.strip_launcher_args(argv) == out
    assert argv == before  # not modified in place


def test_export_round_trip(clean_env):
    d = DistEnv(
        rank=3, world_size=8, local_rank=1, local_world_size=2, master_addr="node9", master_port=29511, launcher="slurm"
    )
    dist.export(d)
    assert (
        os.environ["RANK"],
        os.environ["WORLD_SIZE"],
        os.environ["LOCAL_RANK"],
        os.environ["LOCAL_WORLD_SIZE"],
        os.environ["MASTER_ADDR"],
        os.environ["MASTER_PORT"],
    ) == ("3", "8", "1", "2", "node9", "29511")
    back = detect()  # reads os.environ
    assert _fields(back)[:6] == _fields(d)[:6]
    assert back.launcher == "env"


def test_export_round_trip_from_slurm(clean_env):
    d = detect({**SLURM, "MASTER_ADDR": "gpu-01"})
    dist.export(d)
    assert _fields(detect())[:6] == _fields(d)[:6] == (6, 8, 2, 4, "gpu-01", 23456)


def test_configure_threads_respects_explicit_setting():
    d = DistEnv(0, 4, 0, 4, "127.0.0.1", 29500, "env")
    env = {"OMP_NUM_THREADS": "3"}
    assert dist.configure_threads(d, cpus=64, env=env) == 3
    assert env == {"OMP_NUM_THREADS": "3"}


@pytest.mark.parametrize("cpus,local_world,threads", [(64, 8, 8), (2, 2, 1), (2, 8, 1), (7, 2, 3), (4, 1, 4)])
def test_configure_threads_divides_cores(cpus, local_world, threads):
    d = DistEnv(0, local_world * 2, 0, local_world, "127.0.0.1", 29500, "env")
    env: dict = {}
    assert dist.configure_threads(d, cpus=cpus, env=env) == threads
    assert env == {"OMP_NUM_THREADS": str(threads)}


def test_configure_threads_defaults_to_affinity(clean_env):
    clean_env.delenv("OMP_NUM_THREADS", raising=False)
    d = DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "none")
    env: dict = {}
    assert dist.configure_threads(d, env=env) == len(os.sched_getaffinity(0))


def test_accelerator_name():
    assert dist.accelerator_name(True) == "cuda"
    assert dist.accelerator_name(False) == "cpu"
    import torch

    assert dist.accelerator_name() == ("cuda" if torch.cuda.is_available() else "cpu")
