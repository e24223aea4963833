"""Autocast that is only requested where the device type has it.

``torch.autocast(device_type=...)`` raises for device types without autocast support (e.g. ``meta``, on which
the device-strictness tests run every objective; tests/objectives/test_device_strict.py). Use :func:`autocast`
wherever a step enters low precision so the same code runs on every device.
"""

from __future__ import annotations

import contextlib

import torch


def autocast(
    device_type: str, dtype: torch.dtype, enabled: bool = True
) -> torch.autocast | contextlib.nullcontext[None]:
    """``torch.autocast(device_type, dtype)`` when ``enabled`` and ``device_type`` supports autocast, else a
    no-op context (the computation then runs in the dtypes of its inputs and weights)."""
    if not enabled or not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)
