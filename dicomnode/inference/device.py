"""Where a model runs, and how: device names, mixed precision, determinism, CPU threads.

``parse_device`` only reads a name ("cpu", "cuda", "cuda:N") and never imports torch, so
settings and the CLI can check a name cheaply; ``resolve_device`` also checks that this machine
has it. Mixed precision (``torch.autocast``) is used on a GPU only: CPU runs stay in float32.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dicomnode.errors import DeviceUnavailable, InvalidDevice

if TYPE_CHECKING:
    import torch

_NAME = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    """A torch device by name: ``cpu``, or ``cuda`` with an index (``cuda`` alone is 0)."""

    kind: Literal["cpu", "cuda"] = "cpu"
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch(self) -> torch.device:
        """The ``torch.device`` (imports torch)."""
        import torch

        return torch.device(str(self))

    def autocast(self, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision (float16) on a GPU when ``enabled``; nothing on the CPU."""
        if not (enabled and self.is_cuda):
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type="cuda", dtype=torch.float16)


CPU = Device()


def parse_device(value: str | Device) -> Device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a :class:`Device`; InvalidDevice otherwise."""
    if isinstance(value, Device):
        return value
    text = str(value).strip().lower()
    match = _NAME.match(text)
    if match is None:
        raise InvalidDevice(f"device {value!r} is not one of cpu, cuda, cuda:N (N = 0, 1, ...)")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index is not None:
            raise InvalidDevice(f"device {value!r}: the CPU takes no index; use 'cpu'")
        return CPU
    return Device("cuda", int(index) if index is not None else 0)


def resolve_device(value: str | Device) -> Device:
    """Parse ``value`` and check that torch can use it here; DeviceUnavailable if not."""
    device = parse_device(value)
    if not device.is_cuda:
        return device
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise DeviceUnavailable(
            f"device {str(device)!r} was requested but CUDA is not available here "
            f"(torch {torch.__version__}, {build}); use device 'cpu' or run on a GPU host"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceUnavailable(
            f"device {str(device)!r} was requested but this machine has {count} CUDA "
            f"device(s): cuda:0 to cuda:{count - 1}"
        )
    return device


def configure_torch(
    device: Device, *, seed: int = 0, deterministic: bool = True, threads: int = 0
) -> None:
    """Process-wide torch settings for reproducible runs on ``device``.

    Deterministic algorithms are requested with ``warn_only`` (an operation without a
    deterministic version warns rather than fails); cuDNN autotuning is off so the same
    convolution algorithm is used every time. ``threads`` > 0 sets torch's CPU thread count.
    """
    if device.is_cuda and deterministic:
        # cuBLAS needs this before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every GPU), numpy's global generator and ``random``."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def settle_heap() -> None:
    """Settle the worker's memory once its models are loaded, for every job after.

    - Everything loaded so far (torch, MONAI, the networks: hundreds of thousands of objects) is
      put out of the garbage collector's reach. Otherwise every full collection walks them all,
      and a job that allocates many small objects (pydicom reading 300 headers) pays for it:
      loading a 512x512x300 CT series in a worker, 0.46 -> 0.35 s.
    - Memory freed by a job stays with the process (see :func:`keep_freed_memory`).
    """
    import gc

    gc.collect()
    gc.freeze()
    keep_freed_memory()


#: glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory mapped for the next allocation rather than give it back.

    By default glibc serves every block over 128 KB to 32 MB (pixel data, volumes, feature
    maps) with its own ``mmap`` and unmaps it when freed, so each job faults its gigabytes in
    again, page by page, each page zeroed by the kernel: about 600,000 page faults per lung
    prediction on a 512x512x300 CT. Served from the heap and never trimmed, the next job reuses
    the pages: predict 2.9 -> 2.15 s, and the series load stops varying with how fragmented
    the machine's memory is. The price: the worker's resident memory stays at its largest
    job's (which it needs anyway each time such a job comes). False where the C library is not
    glibc (nothing changes there).
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    no_mmap = libc.mallopt(_M_MMAP_MAX, 0) == 1
    no_trim = libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1  # -1: never trim the heap's top
    return no_mmap and no_trim
