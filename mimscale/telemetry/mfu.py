"""Counted training FLOPs, device peak FLOP/s and model FLOPs utilisation (MFU).

* :func:`count_train_flops` runs one real forward + backward of an objective under
  ``torch.utils.flop_counter.FlopCounterMode`` and returns the FLOPs of the batch. Like the
  analytic counts in :mod:`mimscale.telemetry.flops` it counts matmuls, convolutions and the two
  attention matmuls (2 FLOPs per multiply-accumulate) and nothing else (norms, softmax, GELU,
  the loss and optimizer are 0). It follows the *model FLOPs* convention of MFU (PaLM, appendix B):
  nothing that is recomputed is counted, i.e. activation checkpointing of the encoder is switched
  off while counting and an attention backward is counted as 2x its forward (PyTorch's own
  formula for the fused flash / memory-efficient kernels adds the recomputed score matrix). Recompute
  that an objective does by itself (e.g. EMAE's ``parts_chunk``) is counted as executed.
  Works on CPU, CUDA and the meta device (CPU-side mask bookkeeping is bridged onto meta), so a
  ViT-H count costs nothing but a few milliseconds of Python.
* :data:`PEAK_TFLOPS` / :func:`device_peak_flops`: dense tensor-core peaks from vendor datasheets;
  on CPU a measured matmul rate (:func:`measure_matmul_flops`, cached per process).
* :func:`mfu`: achieved FLOP/s over peak FLOP/s.

Differences between :func:`count_train_flops` and ``Objective.flops_per_sample() x B`` are
systematic and small: the patch-embedding convolution gets no input gradient (the image does not
require grad), so it counts 2x forward instead of the analytic 3x (-0.4 % for MAE ViT-B/16).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError

__all__ = [
    "PEAK_TFLOPS",
    "count_train_flops",
    "cpu_matmul_peak",
    "device_peak_flops",
    "gpu_peak_key",
    "measure_matmul_flops",
    "mfu",
    "peak_flops_for",
    "train_flop_counts",
]

log = logging.getLogger("mimscale.telemetry")

# Dense (no 2:4 sparsity) peak TFLOP/s per GPU, from the NVIDIA datasheets (they print the sparse figure,
# twice these, for tf32/bf16/fp16). "fp32" is the non-tensor-core FP32 rate; "tf32" is the tensor-core rate
# used for fp32 matmuls when torch.backends.cuda.matmul.allow_tf32 / torch.set_float32_matmul_precision("high")
# allow it. A100 SXM4 and PCIe (40 and 80 GB) share the same peaks; H200 SXM and GH200 have the H100 SXM
# compute; H100 NVL and H200 NVL share theirs; B200 is the HGX B200 part (8-GPU totals / 8).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "a100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "a10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "l4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "l40s": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "h100-sxm": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "h100-pcie": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "h100-nvl": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "h200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "h200-nvl": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "gh200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "b200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1125.0, "fp32": 75.0},
}

# torch.cuda.get_device_name() patterns -> PEAK_TFLOPS key, most specific first (matched on the upper-cased name).
_GPU_NAMES: tuple[tuple[str, str], ...] = (
    (r"\bGH200\b", "gh200"),
    (r"\bH200\b.*\bNVL\b", "h200-nvl"),
    (r"\bH200\b", "h200"),
    (r"\bH100\b.*\bNVL\b", "h100-nvl"),
    (r"\bH100\b.*\bPCIE\b", "h100-pcie"),
    (r"\bH100\b", "h100-sxm"),  # "H100 80GB HBM3", "H100 SXM5 80GB"
    (r"\bB200\b", "b200"),
    (r"\bA100\b", "a100"),
    (r"\bL40S\b", "l40s"),
    (r"\bL4\b", "l4"),
    (r"\bA10\b", "a10"),
)
# An unknown name that still names a family ("H100 something new", "A100X", "A10G", "H800"): that family's
# entry, with a warning (the MFU is then an estimate). Family tokens by length, so "L40S" wins over "L4".
_FAMILIES: tuple[tuple[str, str], ...] = (
    ("GH200", "gh200"),
    ("H200", "h200"),
    ("H100", "h100-sxm"),
    ("H800", "h100-sxm"),
    ("B200", "b200"),
    ("A100", "a100"),
    ("A800", "a100"),
    ("L40S", "l40s"),
    ("A10", "a10"),
    ("L4", "l4"),
)
_warned: set[str] = set()

_DTYPE_NAMES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "tf32": "tf32",
}


def _dtype_key(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` / ``"bf16"`` ... -> one of ``bf16 fp16 fp32 tf32``."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    key = _DTYPE_NAMES.get(str(dtype).lower())
    if key is None:
        raise ConfigError(f"unknown dtype '{dtype}' for a peak FLOP/s; use one of bf16, fp16, fp32, tf32")
    return key


def gpu_peak_key(name: str) -> str:
    """Map a ``torch.cuda.get_device_name()`` string to a :data:`PEAK_TFLOPS` key.

    ``"NVIDIA A100-SXM4-80GB"`` -> ``a100``, ``"NVIDIA H100 80GB HBM3"`` -> ``h100-sxm``, ``"NVIDIA H100 PCIe"``
    -> ``h100-pcie``, ``"NVIDIA H100 NVL"`` -> ``h100-nvl``, ``"NVIDIA GH200 480GB"`` -> ``gh200``, ``"NVIDIA
    L40S"`` -> ``l40s`` ... Table keys pass through. A name outside the table that contains a known family
    (``"NVIDIA A10G"``, ``"NVIDIA H800"``) maps to that family's entry with one warning per name; a name with no
    known family raises :class:`ConfigError` (:func:`peak_flops_for` turns that into "no MFU", never an abort).
    """
    if name in PEAK_TFLOPS:
        return name
    n = name.upper()
    for pattern, key in _GPU_NAMES:
        if re.search(pattern, n):
            return key
    for family, key in _FAMILIES:
        if family in n:
            if name not in _warned:
                _warned.add(name)
                log.warning(
                    "GPU '%s' is not in the datasheet table: using %s's peaks (the MFU is an estimate)", name, key
                )
            return key
    raise ConfigError(
        f"no peak FLOP/s known for GPU '{name}' (known: {', '.join(PEAK_TFLOPS)}); pass the peak explicitly"
    )


def device_peak_flops(device: torch.device | str | int, dtype: torch.dtype | str, name: str | None = None) -> float:
    """Peak FLOP/s of one device for matmuls in ``dtype``.

    CUDA (or any device when ``name`` is given, e.g. ``name="NVIDIA A100-SXM4-80GB"`` in a CPU
    test): the datasheet value for the GPU named by ``torch.cuda.get_device_name``. An fp32
    dtype means the tf32 tensor-core rate when PyTorch's fp32 matmul precision is not "highest".
    Other devices (CPU): :func:`measure_matmul_flops` for ``dtype`` (tf32 measures fp32).
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    key = _dtype_key(dtype)
    if name is None and dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    if name is not None:
        if key == "fp32" and torch.get_float32_matmul_precision() != "highest":
            key = "tf32"
        return PEAK_TFLOPS[gpu_peak_key(name)][key] * 1e12
    return measure_matmul_flops({"tf32": "fp32"}.get(key, key), device=dev)


def measure_matmul_flops(
    dtype: torch.dtype | str = torch.float32, n: int = 1024, repeats: int = 3, device: torch.device | str = "cpu"
) -> float:
    """Best-of-``repeats`` FLOP/s of an ``n x n @ n x n`` matmul (``2 n^3`` FLOPs), after one warm-up.

    Cached per process for each (dtype, n, repeats, device): the first call costs
    ``(repeats + 1) x 2 n^3`` FLOPs (~8.6 GFLOP for the defaults), later calls are free.
    """
    return _measure(_dtype_key(dtype), int(n), int(repeats), str(torch.device(device)))


@functools.cache
def _measure(key: str, n: int, repeats: int, device: str) -> float:
    if n < 1 or repeats < 1:
        raise ValueError(f"n={n} and repeats={repeats} must be >= 1")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[key]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-9)


def cpu_matmul_peak(
    dtype: torch.dtype | str = torch.float32, sizes: tuple[int, ...] = (256, 512, 1024, 2048), budget_s: float = 0.25
) -> float:
    """Measured GEMM peak of this process on the CPU: the best :func:`measure_matmul_flops` over ``sizes``.

    Sizes are tried smallest first; the next size is skipped when one of its matmuls would take
    longer than ``budget_s`` at the best rate so far (bf16 on a CPU without AVX512-BF16/AMX is ~30x
    slower than fp32, so the bigger sizes would cost seconds for no information). Uses the current ``torch.get_num_threads()``:
    the peak of what this rank may use. Cached like :func:`measure_matmul_flops`.
    """
    key = {"tf32": "fp32"}.get(_dtype_key(dtype), _dtype_key(dtype))
    best = 0.0
    for n in sorted(int(n) for n in sizes):
        if best and 2.0 * n**3 / best > budget_s:
            break
        best = max(best, measure_matmul_flops(key, n=n))
    return best


def peak_flops_for(device: torch.device | str | int, precision: str, *, name: str | None = None) -> float | None:
    """The peak FLOP/s that MFU divides by, for one device training in ``precision`` (bf16|fp16|fp32).

    Call once per run (the CPU measurement costs ~0.1-1 s), then per logging interval
    ``mfu(flops_per_sample, images_per_s / world_size, peak)``. CUDA (or ``name`` given, e.g. a
    CPU test passing ``name="NVIDIA A100-SXM4-80GB"``): the :data:`PEAK_TFLOPS` datasheet entry;
    ``None`` (with one warning) for a GPU not in the table, so training goes on without ``perf/mfu``.
    CPU: :func:`cpu_matmul_peak` of the precision's dtype.
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    key = _dtype_key(precision)
    if name is None and dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    if name is not None:
        try:
            return device_peak_flops(dev, key, name=name)
        except ConfigError as e:
            log.warning("no MFU: %s", e)
            return None
    return cpu_matmul_peak(key)


def mfu(flops_per_sample: float, images_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``flops_per_sample x images_per_s / peak_flops``.

    Use matching scopes: images/s of one device with that device's peak, or the cluster's images/s
    with the summed peak of all devices.
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be > 0")
    return float(flops_per_sample) * float(images_per_s) / float(peak_flops)


# ----------------------------------------------------------------------------- counting


def _attn_fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """``q @ k^T`` and ``attn @ v``: ``2 b h Lq Lk d + 2 b h Lq Lk d_v`` (shapes ``[b, h, L, d]``)."""
    b, h, lq, d = q
    lk, dv = k[-2], v[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def _attn_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    """Model FLOPs of the attention backward: 2x forward (grads of both matmuls, no recompute)."""
    return 2 * _attn_fwd(q, k, v)


def _attention_formulas() -> dict[Any, Any]:
    aten = torch.ops.aten
    fwd = [
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    ]
    out: dict[Any, Any] = {}
    for name in fwd:
        for op, formula in ((name, _attn_fwd), (name + "_backward", _attn_bwd)):
            if hasattr(aten, op):  # the CPU flash kernel has no formula in PyTorch: it would count 0
                out[getattr(aten, op)] = formula
    return out


class _MetaBridge(TorchDispatchMode):
    """Move CPU tensors onto meta when an op mixes them with meta tensors.

    Lets an objective run on the meta device while its data-dependent bookkeeping (masks from the
    CPU collate, ``nonzero`` over them) stays real on CPU, where it is cheap and exact.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in flat):

            def to_meta(t):
                return t.to("meta") if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t

            args, kwargs = tree_map(to_meta, (args, kwargs))
        return func(*args, **kwargs)


@contextmanager
def meta_bridge(module: nn.Module):
    """Context: :class:`_MetaBridge` when ``module`` has meta parameters or buffers, else nothing."""
    on_meta = any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))
    with _MetaBridge() if on_meta else ExitStack():
        yield


@contextmanager
def _no_checkpointing(module: nn.Module):
    """Switch off ``grad_checkpointing`` on every submodule that has it (ViT encoders); restore after."""
    flagged: list[Any] = [
        m for m in module.modules() if getattr(m, "grad_checkpointing", False)
    ]  # any module with the flag
    for m in flagged:
        m.grad_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.grad_checkpointing = True


def train_flop_counts(objective: nn.Module, batch: dict) -> dict[str, float]:
    """FLOPs of one forward + backward of ``objective(batch).loss`` per aten op (``"total"`` too).

    Gradients already on the parameters are kept: the counting step's gradients are discarded.
    """
    params = [p for p in objective.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with _no_checkpointing(objective), ExitStack() as stack:
            counter = stack.enter_context(FlopCounterMode(display=False, custom_mapping=_attention_formulas()))
            stack.enter_context(meta_bridge(objective))  # innermost: converts before the counter sees ops
            out = objective(batch)
            loss = out.loss if hasattr(out, "loss") else out
            loss.backward()
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    counts = {str(op).removeprefix("aten."): float(v) for op, v in counter.get_flop_counts()["Global"].items()}
    counts["total"] = float(counter.get_total_flops())
    return counts


def count_train_flops(objective: nn.Module, batch: dict) -> float:
    """Total FLOPs of one training forward + backward of ``objective`` on ``batch`` (all samples).

    Compare with ``objective.flops_per_sample() * batch_size`` (see the module docstring for the
    small systematic difference).
    """
    return train_flop_counts(objective, batch)["total"]
