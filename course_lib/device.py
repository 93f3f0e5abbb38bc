"""Devices, seeding and mixed-precision dtypes.

Every chapter starts with ``device = get_device()``: CUDA when a GPU is present, otherwise the CPU.
Apple's MPS backend is only used when asked for (``get_device(allow_mps=True)``) because several
operations the course uses are missing or slow there.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

DEVICE_ENV = "COURSE_DEVICE"


def get_device(preferred: str | torch.device | None = None, *, allow_mps: bool = False) -> torch.device:
    """Return the device to compute on.

    Order: ``preferred`` if given, else the ``COURSE_DEVICE`` environment variable, else CUDA when
    available, else MPS when ``allow_mps`` and available, else CPU.

    Raises:
        RuntimeError: if a device was asked for explicitly but is not available here.
    """
    choice = preferred if preferred is not None else os.environ.get(DEVICE_ENV) or None
    if choice is not None:
        device = torch.device(choice)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"Device {device} was requested but PyTorch sees no CUDA GPU here. "
                f"Use get_device() without arguments (or unset {DEVICE_ENV}) to run on the CPU."
            )
        if device.type == "mps" and not _mps_available():
            raise RuntimeError(f"Device {device} was requested but MPS is not available here.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if allow_mps and _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (CPU and every GPU) and return a seeded CPU generator.

    Seeding makes a run repeatable on the same machine and library versions; GPU kernels may
    still differ in the last bits between runs unless deterministic algorithms are enabled.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def autocast_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype to use inside ``torch.autocast`` on ``device``.

    - CUDA: bfloat16 when the GPU supports it (Ampere and newer), else float16 (which then needs
      a gradient scaler).
    - CPU and MPS: float32 — we train in full precision there; CPU bf16 autocast is slower than
      fp32 on most laptops and changes results.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def describe_device(device: str | torch.device | None = None) -> str:
    """A one-line human description, e.g. ``'cuda (NVIDIA H100 80GB HBM3)'`` or ``'cpu (8 threads)'``."""
    device = get_device() if device is None else torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type
