"""The tools that read what the node writes, as PACS and viewers do: dicom3tools' ``dciodvfy``
checks an object against its IOD, dcmqi's ``segimage2itkimage`` and ``tid1500reader`` read SEG
and TID 1500 SR as 3D Slicer does. For tests and benchmarks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.testing.peers import missing_peer, peers_required

#: where each tool comes from
PACKAGES = {
    "dciodvfy": "Debian package dicom3tools",
    "segimage2itkimage": "PyPI dcmqi",
    "tid1500reader": "PyPI dcmqi",
}


def tool(name: str) -> str | None:
    """A tool on PATH or beside this Python (dcmqi's console scripts live in the venv)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


def require_tool(name: str) -> str:
    """The tool's path, for a test that needs it; without it the test is skipped, or fails
    where $DICOMNODE_REQUIRE_PEERS=1 (CI), so CI cannot pass without validating."""
    path = tool(name)
    if path is None:
        missing_peer(f"{name} is not installed ({PACKAGES.get(name, 'see scripts/setup.sh')})")
    return path


def has_tool(name: str) -> bool:
    """Whether a test's optional check with the tool can run: False without it, unless
    $DICOMNODE_REQUIRE_PEERS=1 (CI), where the test fails instead."""
    if tool(name) is not None:
        return True
    if peers_required():
        require_tool(name)  # fails
    return False


@dataclass(frozen=True)
class IodReport:
    """What ``dciodvfy`` said about one file."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str


def dciodvfy(path: Path | str) -> IodReport:
    """Check ``path`` against its IOD (Debian package dicom3tools)."""
    exe = tool("dciodvfy")
    if exe is None:
        raise RuntimeError("dciodvfy is not installed (Debian package dicom3tools)")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    errors = tuple(line for line in lines if line.startswith("Error"))
    warnings = tuple(line for line in lines if line.startswith("Warning"))
    if run.returncode != 0 and not errors:
        errors = (f"dciodvfy exited with {run.returncode}",)
    return IodReport(errors, warnings, "\n".join(lines))


def segimage2itkimage(path: Path | str, out: Path) -> tuple[list[Path], dict[str, Any]]:
    """dcmqi: a SEG as NIfTI images (one per group of non-overlapping segments, voxel value =
    segment number) and its meta.json."""
    exe = tool("segimage2itkimage")
    if exe is None:
        raise RuntimeError("segimage2itkimage is not installed (PyPI dcmqi)")
    out.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        [exe, "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nifti"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode != 0:
        raise RuntimeError(f"segimage2itkimage failed on {path}: {run.stdout}{run.stderr}")
    meta = json.loads((out / "meta.json").read_text())
    return sorted(out.glob("*.nii.gz")), meta


def tid1500reader(path: Path | str, out: Path) -> dict[str, Any]:
    """dcmqi: a TID 1500 SR as dcmqi's JSON (measurement groups, image library, ...)."""
    exe = tool("tid1500reader")
    if exe is None:
        raise RuntimeError("tid1500reader is not installed (PyPI dcmqi)")
    run = subprocess.run(
        [exe, "--inputDICOM", str(path), "--outputMetadata", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if run.returncode != 0 or not out.is_file():
        raise RuntimeError(f"tid1500reader failed on {path}: {run.stdout}{run.stderr}")
    return dict(json.loads(out.read_text()))
