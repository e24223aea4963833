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


# ----------------------------------------------------------------------------- the device each rank binds


def test_device_ordinal_covers_both_binding_styles():
    assert dist.device_ordinal(3, 8) == 3  # every task sees the node's 8 GPUs (--gpus-per-node)
    assert dist.device_ordinal(3, 1) == 0  # each task sees only its own (--gpus-per-task / --gpu-bind / cgroups)
    assert dist.device_ordinal(5, 4) == 1
    with pytest.raises(LaunchError, match="no devices"):
        dist.device_ordinal(0, 0)


class FakeGPUs:
    """``torch.cuda`` on a CPU box: ``n`` visible devices; records ``set_device``."""

    def __init__(self, monkeypatch, n: int):
        import torch

        self.current: list[int] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda dev: self.current.append(_ordinal(dev)))


def _ordinal(dev) -> int:
    import torch

    return dev if isinstance(dev, int) else torch.device(dev).index


@pytest.mark.parametrize(("visible", "ordinal", "local_rank_env"), [(4, 3, None), (1, 0, "0")])
def test_bind_device_on_cuda(monkeypatch, visible, ordinal, local_rank_env):
    import torch

    gpus = FakeGPUs(monkeypatch, visible)
    d = DistEnv(7, 8, 3, 4, "127.0.0.1", 29500, "slurm")
    env: dict = {}
    assert dist.bind_device(d, env=env) == torch.device("cuda", ordinal)
    assert gpus.current == [ordinal]
    assert env.get("LOCAL_RANK") == local_rank_env  # DeepSpeed / accelerate read LOCAL_RANK as the ordinal


def test_bind_device_on_cpu_touches_nothing(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: pytest.fail("set_device on a CPU node"))
    env: dict = {}
    assert dist.bind_device(DistEnv(1, 2, 1, 2, "h", 1, "env"), "cpu", env=env) == torch.device("cpu")
    assert env == {}


# ----------------------------------------------------------------------------- every entry point asks for CUDA


class _Reached(Exception):
    """Raised where an entry point hands its accelerator to DeepSpeed / accelerate (nothing is built)."""


@pytest.fixture
def cuda_node(monkeypatch, clean_env):
    """A node where PyTorch sees ONE GPU per task (``--gpus-per-task``), launched as local rank 1 of 2, with no
    DeepSpeed accelerator pinned: whatever an entry point hands DeepSpeed / accelerate must then be CUDA, on
    ordinal 0. TF32 switches and the process environment are restored afterwards."""
    import torch

    saved_env, threads = dict(os.environ), torch.get_num_threads()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    gpus = FakeGPUs(monkeypatch, 1)
    yield gpus
    os.environ.clear()
    os.environ.update(saved_env)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    torch.set_num_threads(threads)


def _engine_request(monkeypatch):
    """Replace ``engine.deepspeed.initialize`` by a probe: records the accelerator asked for and the environment
    DeepSpeed would start in, then stops the entry point."""
    from mimscale.engine import deepspeed as ds

    seen: dict = {}

    def probe(objective, cfg, derived, accelerator, *a, **k):
        seen.update(
            accelerator=accelerator, ds_env=os.environ.get("DS_ACCELERATOR"), local_rank=os.environ["LOCAL_RANK"]
        )
        raise _Reached

    monkeypatch.setattr(ds, "initialize", probe)
    return seen


def _assert_cuda(seen: dict, gpus: FakeGPUs) -> None:
    import torch

    assert seen["accelerator"] == "cuda"
    assert seen["ds_env"] in (None, "cuda"), "DeepSpeed would be pinned to the CPU"
    assert seen["local_rank"] == "0" and gpus.current == [0]  # bound before DeepSpeed starts
    assert torch.backends.cuda.matmul.allow_tf32  # the recipe's train.tf32 (default true), as in training


def test_pretrain_trainer_asks_deepspeed_for_the_gpu(cuda_node, monkeypatch, tmp_path, fmnist_small):
    from mimscale import config as C
    from mimscale.pretrain import trainer

    seen = _engine_request(monkeypatch)
    cfg = C.load(
        None,
        [
            "model.arch=vit_micro",
            "model.img_size=16",
            "model.patch_size=4",
            f"data.train={fmnist_small['train']}",
            f"train.run_dir={tmp_path}",
            "train.batch_size=16",
            "train.micro_batch_size=8",
            "log.wandb=disabled",
        ],
    )
    with pytest.raises(_Reached):
        trainer(cfg)
    _assert_cuda(seen, cuda_node)


def test_bench_throughput_asks_deepspeed_for_the_gpu_with_training_backends(cuda_node, monkeypatch):
    import torch

    from mimscale.bench.throughput import ThroughputConfig, measure

    seen = _engine_request(monkeypatch)
    torch.backends.cuda.matmul.allow_tf32 = False  # measure() must set it the way training does
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(_Reached):
        measure(ThroughputConfig(arch="vit_micro", img=16, patch=4, micro_batch=2, steps=1, warmup=0))
    assert seen["accelerator"] == "cuda" and seen["ds_env"] in (None, "cuda") and cuda_node.current == [0]
    assert torch.backends.cuda.matmul.allow_tf32


def test_eval_asks_accelerate_for_the_gpu(cuda_node, monkeypatch, tmp_path, fmnist_small):
    import accelerate
    import torch
    from safetensors.torch import save_file

    from mimscale.cli import main
    from mimscale.models.vit import build_vit

    enc = build_vit("vit_micro", 16, 4)
    weights = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in enc.export_state_dict(enc.state_dict()).items()}, str(weights))
    seen: dict = {}

    def probe(*a, cpu=False, **k):
        seen.update(cpu=cpu, local_rank=os.environ["LOCAL_RANK"])
        raise _Reached

    monkeypatch.setattr(accelerate, "Accelerator", probe)
    with pytest.raises(_Reached):
        main(["eval", "knn", str(weights), "--data", str(fmnist_small["train"]), "--test", str(fmnist_small["train"])])
    assert seen == {"cpu": False, "local_rank": "0"} and cuda_node.current == [0]
    assert torch.cuda.is_available()


def test_teacher_tools_bind_the_same_gpu(cuda_node):
    import torch

    from mimscale.teachers.launch import resolve_device

    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 0) and cuda_node.current == [0]


def test_benchmark_launchers_do_not_pin_the_cpu_on_a_gpu_node(cuda_node, monkeypatch):
    import importlib.util

    from launch_utils import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))

    spec = importlib.util.spec_from_file_location("loop_overhead", REPO / "benchmarks" / "loop_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    acc = mod.resolve_accelerator("auto")
    assert acc == "cuda"
    os.environ["DS_ACCELERATOR"] = "cpu"  # even a pin left in the caller's environment
    assert mod._env(acc).get("DS_ACCELERATOR") != "cpu"
