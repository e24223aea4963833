"""memory_stats / reset_peak: the real process numbers on CPU, and the CUDA
branch run on CPU against a stand-in for the torch.cuda namespace."""

from __future__ import annotations

import torch

from mimscale.telemetry import memory_stats, reset_peak
from mimscale.telemetry import memory as memory_mod

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


class FakeCuda:
    """The four torch.cuda functions the CUDA branch calls, with fixed byte counts."""

    def __init__(self):
        self.calls = []

    def memory_allocated(self, device):
        self.calls.append(("memory_allocated", device))
        return 3 * GiB

    def max_memory_allocated(self, device):
        self.calls.append(("max_memory_allocated", device))
        return 5 * GiB + GiB // 2

    def memory_reserved(self, device):
        self.calls.append(("memory_reserved", device))
        return 6 * GiB + GiB // 4

    def reset_peak_memory_stats(self, device):
        self.calls.append(("reset_peak_memory_stats", device))


def test_cuda_branch_maps_bytes_to_gb():
    fake = FakeCuda()
    dev = torch.device("cuda", 1)
    assert memory_stats(dev, cuda=fake) == {
        "perf/mem_allocated_gb": 3.0,
        "perf/mem_peak_gb": 5.5,
        "perf/mem_reserved_gb": 6.25,
    }
    reset_peak("cuda:1", cuda=fake)
    assert [name for name, _ in fake.calls] == [
        "memory_allocated", "max_memory_allocated", "memory_reserved", "reset_peak_memory_stats"]
    assert all(d == dev for _, d in fake.calls)  # the device is passed through, not the current one

    fake.calls.clear()
    memory_stats("cpu", cuda=fake)
    reset_peak("cpu", cuda=fake)
    assert fake.calls == []  # CPU never touches the CUDA namespace


def test_stand_in_matches_the_real_torch_cuda_names():
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "reset_peak_memory_stats"):
        assert callable(getattr(torch.cuda, name))
