"""`dicomnode worker` loads its models through the registry and refuses a device it cannot use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicomnode.testing.process import cli


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "DICOMNODE_NODE__STORAGE_DIR": str(tmp_path / "node")}


def test_worker_refuses_an_invalid_device(tmp_path: Path) -> None:
    result = cli("worker", "--device", "tpu:0", env=_env(tmp_path))
    assert result.returncode == 2
    assert "device 'tpu:0' is not one of cpu, cuda, cuda:N" in result.stderr


def test_worker_refuses_cuda_without_cuda(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("worker", "--device", "cuda:1", env=_env(tmp_path))
    assert result.returncode == 2
    assert "device 'cuda:1' was requested but CUDA is not available" in result.stderr


def test_worker_refuses_an_unknown_model(tmp_path: Path) -> None:
    cli("db", "upgrade", env=_env(tmp_path))
    result = cli("worker", "--models", "echo,nope", env=_env(tmp_path))
    assert result.returncode == 2
    assert "unknown model(s) 'nope'; available: " in result.stderr
    available = result.stderr.split("available: ", 1)[1].split()[0:10]
    assert "echo" in " ".join(available) and "lung_nodule" in " ".join(available)
