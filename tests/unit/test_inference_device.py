"""Device names, placement checks, mixed precision only on a GPU, deterministic settings."""

from __future__ import annotations

import contextlib

import pytest

from dicomnode.errors import ConfigError, DeviceUnavailable, InvalidDevice
from dicomnode.inference.device import CPU, Device, parse_device, resolve_device


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cpu", CPU),
        (" CPU ", CPU),
        ("cuda", Device("cuda", 0)),
        ("cuda:0", Device("cuda", 0)),
        ("cuda:3", Device("cuda", 3)),
        (Device("cuda", 1), Device("cuda", 1)),
    ],
)
def test_device_names(name: str | Device, expected: Device) -> None:
    assert parse_device(name) == expected


def test_device_text() -> None:
    assert str(parse_device("cpu")) == "cpu"
    assert str(parse_device("cuda")) == "cuda:0"
    assert parse_device("cuda:2").is_cuda and not CPU.is_cuda


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cpu:0", "tpu", "", "cuda:-1"])
def test_invalid_device_names_say_what_is_expected(name: str) -> None:
    with pytest.raises(InvalidDevice) as caught:
        parse_device(name)
    assert repr(name) in str(caught.value)
    assert "cpu" in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceUnavailable) as caught:
        resolve_device("cuda:0")
    message = str(caught.value)
    assert "'cuda:0'" in message and "CUDA is not available" in message and "cpu" in message


def test_cuda_index_beyond_the_devices_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    count = torch.cuda.device_count()
    with pytest.raises(DeviceUnavailable, match=f"has {count} CUDA device"):
        resolve_device(f"cuda:{count}")


def test_cpu_resolves_without_torch_device_checks() -> None:
    assert resolve_device("cpu") == CPU


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_only_on_a_gpu() -> None:
    assert isinstance(CPU.autocast(), contextlib.nullcontext)
    assert isinstance(Device("cuda", 0).autocast(enabled=False), contextlib.nullcontext)
    torch = pytest.importorskip("torch")
    cast = Device("cuda", 0).autocast()
    assert isinstance(cast, torch.autocast)


def test_configure_torch_sets_determinism_and_threads() -> None:
    torch = pytest.importorskip("torch")
    from dicomnode.inference.device import configure_torch

    threads = torch.get_num_threads()
    try:
        configure_torch(CPU, seed=7, deterministic=True, threads=1)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.get_num_threads() == 1
        first = torch.rand(3)
        configure_torch(CPU, seed=7, deterministic=True, threads=1)
        assert torch.equal(first, torch.rand(3))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


_FAULTS_OF_REUSE = """
import resource, sys
import numpy as np
from dicomnode.inference.device import keep_freed_memory

if sys.argv[1] == "keep":
    assert keep_freed_memory()
np.ones((64, 1024, 1024), np.uint8)  # 64 MB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones((64, 1024, 1024), np.uint8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    __import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc settings"
)
def test_freed_memory_is_reused_without_faulting_it_in_again() -> None:
    # A fresh process each: the setting is process-wide and cannot be taken back.
    import os
    import subprocess
    import sys

    def faults(mode: str) -> int:
        # 4 KB pages, so that faults count the pages (numpy asks for huge pages otherwise)
        env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0"}
        run = subprocess.run(
            [sys.executable, "-c", _FAULTS_OF_REUSE, mode],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        return int(run.stdout)

    default, kept = faults("default"), faults("keep")
    assert default > 64 * 1024 // 4 // 2  # 64 MB unmapped and faulted in again, page by page
    assert kept < default // 20
