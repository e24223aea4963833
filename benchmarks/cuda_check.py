"""Exit 0 when PyTorch can use a CUDA device; else one line on stderr that says why, and exit 3.

Used by benchmarks/gpu.sh and benchmarks/gpu_smoke.sh before anything starts:

  python benchmarks/cuda_check.py gpu.sh

Three cases: a usable device (exit 0, silent); no GPU at all ("no CUDA device ... pass --cpu-smoke"); GPUs that
``nvidia-smi`` lists but PyTorch cannot use -- most often a driver older than the CUDA this torch was built for
("CUDA driver version is insufficient for CUDA runtime version"), which PyTorch reports only as
``torch.cuda.is_available() == False`` plus a warning: the line names both CUDA versions and the fix.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings


def nvidia_smi() -> dict | None:
    """``{"gpus": [...], "driver": "550.54", "cuda": "12.4"}`` from ``nvidia-smi``, or None without one / no GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        listing = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout
        header = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = [ln.strip() for ln in listing.splitlines() if ln.startswith("GPU ")]
    if not gpus:
        return None
    driver = re.search(r"Driver Version:\s*([\d.]+)", header)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {"gpus": gpus, "driver": driver and driver.group(1), "cuda": cuda and cuda.group(1)}


def _version(v: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v or "")[:2])


def diagnose(prog: str) -> str | None:
    """None when CUDA is usable, else the one-line error."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    if ok:
        return None
    smi = nvidia_smi()
    if smi is None:
        return (
            f"{prog}: error: no CUDA device visible to PyTorch (torch.cuda.is_available() is False): run it on a "
            "GPU node, or pass --cpu-smoke"
        )
    built = torch.version.cuda
    why = " ".join(str(caught[-1].message).split()) if caught else "torch.cuda.is_available() is False"
    n = len(smi["gpus"])
    head = f"{prog}: error: nvidia-smi lists {n} GPU(s) (driver {smi['driver'] or '?'}, CUDA {smi['cuda'] or '?'})"
    if built and smi["cuda"] and _version(smi["cuda"]) < _version(built):
        return (
            f"{head} but torch {torch.__version__} is built for CUDA {built}: the driver is too old for this "
            f"build (CUDA driver version is insufficient); update the driver to one for CUDA >= {built}, or install "
            f"a torch built for CUDA <= {smi['cuda']}"
        )
    return f"{head} but PyTorch cannot use them ({why}); check CUDA_VISIBLE_DEVICES and the driver"


def main() -> int:
    msg = diagnose(sys.argv[1] if len(sys.argv) > 1 else "cuda_check")
    if msg:
        print(msg, file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
