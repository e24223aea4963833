"""memory_stats / reset_peak: the real process numbers on CPU, and the CUDA
branch run on CPU against a stand-in for the torch.cuda namespace."""

from __future__ import annotations

import torch

from mimscale.telemetry import memory as memory_mod
from mimscale.telemetry import memory_stats, reset_peak

KEYS = {"perf/mem_allocated_gb", "perf/mem_peak_gb", "perf/mem_reserved_gb"}
GiB = 1 << 30


def test_cpu_numbers_are_positive_and_track_rss():
    before = memory_stats(torch.device("cpu"))
    assert set(before) == KEYS
    assert all(isinstance(v, float) and v > 0 for v in before.values())
    assert before["perf/mem_peak_gb"] >= before["perf/mem_allocated_gb"]
    assert before["perf/mem_reserved_gb"] == before["perf/mem_allocated_gb"]  # reserved = RSS

    big = torch.ones(64 << 20)  # 256 MiB, touched
    during = memory_stats("cpu")
    assert during["perf/mem_allocated_gb"] - before["perf/mem_allocated_gb"] > 0.2
    assert during["perf/mem_peak_gb"] >= during["perf/mem_allocated_gb"]
    del big
    reset_peak("cpu")  # documented no-op: the kernel's high-water mark stays
    assert memory_stats("cpu")["perf/mem_peak_gb"] >= during["perf/mem_allocated_gb"]


def test_proc_status_parsing(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t 9999 kB\nVmHWM:\t  524288 kB\nVmRSS:\t  262144 kB\nThreads:\t4\n")
    assert memory_mod._read_proc_status(str(status)) == {"VmHWM": 512 << 20, "VmRSS": 256 << 20}
    assert memory_mod._read_proc_status(str(tmp_path / "missing")) == {}  # no /proc (macOS)
    # without /proc the peak RSS from getrusage stands in for everything
    stats = memory_mod._process_stats(str(tmp_path / "missing"))
    assert stats["perf/mem_allocated_gb"] == stats["perf/mem_reserved_gb"] > 0
    assert stats["perf/mem_peak_gb"] >= stats["perf/mem_allocated_gb"]


def cuda_stats_dict(allocated: int, peak: int, reserved: int) -> dict:
    """A dict in the exact format of ``torch.cuda.memory_stats``: torch's own flattening of the
    nested ``torch._C._cuda_memoryStats`` structure (every stat x pool x metric, event counters)."""
    from torch.cuda import memory as cm

    def pools(current, peak_):
        metrics = {"current": current, "peak": peak_, "allocated": peak_ * 3, "freed": peak_ * 3 - current}
        return {"all": metrics, "large_pool": dict(metrics), "small_pool": {k: 0 for k in metrics}}

    nested = {
        name: pools(1 + allocated // 4096, 1 + peak // 4096)
        for name in ("allocation", "segment", "active", "inactive_split")
    }
    nested.update(
        allocated_bytes=pools(allocated, peak),
        reserved_bytes=pools(reserved, reserved + GiB),
        active_bytes=pools(allocated, peak),
        inactive_split_bytes=pools(0, 0),
        requested_bytes=pools(allocated - 512, peak - 512),
        oversize_allocations={"current": 0, "peak": 0, "allocated": 0, "freed": 0},
        oversize_segments={"current": 0, "peak": 0, "allocated": 0, "freed": 0},
        num_alloc_retries=2,
        num_ooms=0,
        num_sync_all_streams=0,
        num_device_alloc=7,
        num_device_free=1,
        max_split_size=-1,
    )
    out: list = []
    cm._recurse_add_to_result(out, "", nested, str)
    return dict(sorted(out))


class FakeCuda:
    """The two torch.cuda functions the CUDA branch calls; memory_stats in torch's real format."""

    def __init__(self):
        self.calls = []

    def memory_stats(self, device):
        self.calls.append(("memory_stats", device))
        return cuda_stats_dict(3 * GiB, 5 * GiB + GiB // 2, 6 * GiB + GiB // 4)

    def reset_peak_memory_stats(self, device):
        self.calls.append(("reset_peak_memory_stats", device))


def test_cuda_memory_gb_reads_the_torch_memory_stats_keys():
    stats = cuda_stats_dict(3 * GiB, 5 * GiB + GiB // 2, 6 * GiB + GiB // 4)
    assert "allocated_bytes.all.current" in stats and "reserved_bytes.large_pool.peak" in stats  # real format
    assert memory_mod.cuda_memory_gb(stats) == {
        "perf/mem_allocated_gb": 3.0,
        "perf/mem_peak_gb": 5.5,
        "perf/mem_reserved_gb": 6.25,
    }
    # before CUDA is initialised torch returns {}: zeros, not a KeyError
    assert memory_mod.cuda_memory_gb({}) == dict.fromkeys(KEYS, 0.0)


def test_cuda_branch_maps_bytes_to_gb():
    fake = FakeCuda()
    dev = torch.device("cuda", 1)
    assert memory_stats(dev, cuda=fake) == {
        "perf/mem_allocated_gb": 3.0,
        "perf/mem_peak_gb": 5.5,
        "perf/mem_reserved_gb": 6.25,
    }
    reset_peak("cuda:1", cuda=fake)
    assert [name for name, _ in fake.calls] == ["memory_stats", "reset_peak_memory_stats"]
    assert all(d == dev for _, d in fake.calls)  # the device is passed through, not the current one

    fake.calls.clear()
    memory_stats("cpu", cuda=fake)
    reset_peak("cpu", cuda=fake)
    assert fake.calls == []  # CPU never touches the CUDA namespace


def test_cuda_branch_with_the_real_torch_cuda_namespace():
    """The CUDA branch against the real ``torch.cuda``: on a machine without a GPU (CUDA never
    initialised) ``torch.cuda.memory_stats`` is {} and the numbers are 0; on a GPU they are real."""
    got = memory_stats(torch.device("cuda", 0))
    assert set(got) == KEYS and all(v >= 0.0 for v in got.values())
    if not torch.cuda.is_available():
        assert got == dict.fromkeys(KEYS, 0.0)


def test_stand_in_matches_the_real_torch_cuda_names():
    for name in ("memory_stats", "reset_peak_memory_stats"):
        assert callable(getattr(torch.cuda, name))
    assert callable(torch.cuda.memory._recurse_add_to_result)  # the flattening cuda_stats_dict relies on
