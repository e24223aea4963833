"""Memory numbers for the ``perf/`` metric group.

:func:`memory_stats` returns, in GB (here 1 GB = 2**30 bytes, the unit
``torch.cuda`` and ``nvidia-smi`` report in):

==========================  ==============================  ===========================
key                         CUDA device                     CPU (and any other device)
==========================  ==============================  ===========================
``perf/mem_allocated_gb``   ``memory_allocated`` (tensors)  resident set size (VmRSS)
``perf/mem_peak_gb``        ``max_memory_allocated``        peak RSS (VmHWM / ru_maxrss)
``perf/mem_reserved_gb``    ``memory_reserved`` (caching    resident set size (VmRSS)
                            allocator's pool)
==========================  ==============================  ===========================

The CUDA peak is since the last :func:`reset_peak` (call it after logging to
get a per-interval peak); the CPU peak is since process start, because the
kernel's high-water mark is not reset by :func:`reset_peak`.

The CUDA numbers come from one ``torch.cuda.memory_stats(device)`` call,
turned into the keys above by :func:`cuda_memory_gb` (a pure function of that
flat ``"allocated_bytes.all.current"``-style dict, so a CPU test feeds it a
real-shaped dict). Both functions also take the CUDA namespace as a ``cuda=``
parameter (default ``torch.cuda``) so the CUDA branch runs on a machine
without a GPU against a stand-in exposing ``memory_stats`` and
``reset_peak_memory_stats``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["GB", "cuda_memory_gb", "memory_stats", "reset_peak"]

GB = float(1 << 30)

_PROC_STATUS = "/proc/self/status"


def _as_device(device: torch.device | str | int) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _read_proc_status(path: str = _PROC_STATUS) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` from a ``/proc/<pid>/status`` file, in bytes ({} if unreadable)."""
    out: dict[str, int] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields = rest.split()
                    if fields and fields[0].isdigit():
                        unit = fields[1].lower() if len(fields) > 1 else "kb"
                        scale = {"kb": 1024, "mb": 1 << 20, "gb": 1 << 30, "b": 1}.get(unit, 1024)
                        out[key] = int(fields[0]) * scale
    except OSError:
        pass
    return out


def _max_rss_bytes() -> int:
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


# Largest RSS seen by _process_stats: the kernel's per-thread RSS counters are
# synced lazily, so VmHWM can trail an earlier VmRSS reading by a few pages.
_seen_peak = 0


def _process_stats(status_path: str = _PROC_STATUS) -> dict[str, float]:
    global _seen_peak
    status = _read_proc_status(status_path)
    peak = max(status.get("VmHWM", 0), _max_rss_bytes())
    rss = status.get("VmRSS", peak)  # no /proc (macOS): the peak is the best we have
    _seen_peak = max(_seen_peak, peak, rss)
    return {
        "perf/mem_allocated_gb": rss / GB,
        "perf/mem_peak_gb": _seen_peak / GB,
        "perf/mem_reserved_gb": rss / GB,
    }


def cuda_memory_gb(stats: Mapping[str, Any]) -> dict[str, float]:
    """The ``perf/mem_*_gb`` keys from a ``torch.cuda.memory_stats(device)`` dict (bytes -> GB).

    allocated = ``allocated_bytes.all.current`` (what ``torch.cuda.memory_allocated`` returns),
    peak = ``allocated_bytes.all.peak`` (``max_memory_allocated``), reserved =
    ``reserved_bytes.all.current`` (``memory_reserved``). Missing keys count 0, as in torch
    (``memory_stats`` is ``{}`` before CUDA is initialised).
    """

    def gb(key: str) -> float:
        return float(stats.get(key, 0)) / GB

    return {
        "perf/mem_allocated_gb": gb("allocated_bytes.all.current"),
        "perf/mem_peak_gb": gb("allocated_bytes.all.peak"),
        "perf/mem_reserved_gb": gb("reserved_bytes.all.current"),
    }


def memory_stats(device: torch.device | str | int, *, cuda: Any = None) -> dict[str, float]:
    """Allocated, peak and reserved memory of ``device`` in GB (see the module doc).

    ``cuda`` is the namespace the CUDA branch calls; ``None`` means ``torch.cuda``.
    """
    device = _as_device(device)
    if device.type == "cuda":
        cuda = torch.cuda if cuda is None else cuda
        return cuda_memory_gb(cuda.memory_stats(device))
    return _process_stats()


def reset_peak(device: torch.device | str | int, *, cuda: Any = None) -> None:
    """Start a new peak-memory interval on ``device``.

    CUDA: ``torch.cuda.reset_peak_memory_stats(device)``. CPU and other
    devices: a no-op -- the process's peak RSS is a kernel high-water mark
    since process start, so ``perf/mem_peak_gb`` on CPU never goes down.
    """
    device = _as_device(device)
    if device.type == "cuda":
        cuda = torch.cuda if cuda is None else cuda
        cuda.reset_peak_memory_stats(device)
