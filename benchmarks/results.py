#!/usr/bin/env python3
"""Results benchmark: the time to build a lung job's SEG and TID 1500 SR with dicomnode.results.

    .venv/bin/python -P benchmarks/results.py [--slices 300] [--nodules 5] [--runs 5] [--out DIR]

The input is a chest phantom of ``--slices`` 512x512 slices (0.7 x 0.7 x 1.0 mm) with
``--nodules`` nodules, written once (and reused) as single-frame CT files and as one Enhanced CT
object; the findings are what the lung nodule model reports for it (one finding per nodule, the
``nodules`` label map on the source grid). Per layout, each step runs once cold (the first
highdicom call in the process loads its standard tables) and then ``--runs`` times; the table
gives the cold time and the median warm time in seconds. Target: SEG + SR under 1 s.
Sending them is measured by benchmarks/results_send.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROWS = COLUMNS = 512
WHEN = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def phantom_series(folder: Path, slices: int, nodules: int, enhanced: bool) -> list[Path]:
    """Write (or reuse) the chest phantom; its truth.json is beside the files."""
    from dicomnode.phantoms.chest import chest_ct

    marker = folder / "complete.json"
    spec = {"slices": slices, "nodules": nodules, "enhanced": enhanced, "rows": ROWS}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return sorted(folder.glob("*.dcm"))
    shutil.rmtree(folder, ignore_errors=True)
    phantom = chest_ct((slices, ROWS, COLUMNS), (0.7, 0.7, 1.0), "axial", nodules=nodules, seed=21)
    paths = phantom.write(folder, enhanced=enhanced)
    marker.write_text(json.dumps(spec))
    return paths


def lung_findings(volume: Any, folder: Path) -> Any:
    """The lung model's findings for the phantom: its nodules, labelled 1..n on the grid."""
    import numpy as np

    from dicomnode.domain import Code, Finding, Findings, MaskRef
    from dicomnode.phantoms.chest import Truth

    truth = Truth.load(folder)
    labels = np.zeros(volume.geometry.shape, dtype=np.uint8)
    findings = []
    spacing = np.array(volume.geometry.spacing)  # i, j, k
    for n, nodule in enumerate(truth.nodules, start=1):
        # a ball of the nodule's diameter around its centre, on the loaded volume's grid
        centre = volume.geometry.patient_to_voxel(nodule.center_mm)
        half = np.ceil(nodule.diameter_mm / 2 / spacing).astype(int) + 1
        lo = np.maximum(np.floor(centre).astype(int) - half, 0)
        hi = np.minimum(np.ceil(centre).astype(int) + half + 1, labels.shape[::-1])
        kk, jj, ii = np.ogrid[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
        distance = np.sqrt(((ii - centre[0]) * spacing[0]) ** 2
                           + ((jj - centre[1]) * spacing[1]) ** 2
                           + ((kk - centre[2]) * spacing[2]) ** 2)  # fmt: skip
        box = labels[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
        box[distance <= nodule.diameter_mm / 2] = n
        findings.append(
            Finding("nodule", Code("27925004", "SCT", "Nodule"), 0.9,
                    Code("39607008", "SCT", "Lung structure"), nodule.center_mm,
                    nodule.diameter_mm, nodule.volume_mm3, MaskRef("nodules", n))
        )  # fmt: skip
    return Findings("lung_nodule", "0.1.0", True, tuple(findings), {"nodules": labels})


def measure(paths: list[Path], folder: Path, runs: int) -> dict[str, tuple[float, float]]:
    """Cold and median warm seconds of each step, for one layout."""
    from dicomnode.imaging import load_series
    from dicomnode.results import FindingClass, write_objects
    from dicomnode.results.build import BuiltObjects
    from dicomnode.results.common import Producer
    from dicomnode.results.regions import finding_regions
    from dicomnode.results.seg import build_seg
    from dicomnode.results.source import SourceImages, read_headers
    from dicomnode.results.sr import CT_CHEST, build_sr
    from dicomnode.results.uids import ResultUIDs, job_key

    volume = load_series(paths)
    findings = lung_findings(volume, folder)
    producer = Producer("lung_nodule", "0.1.0", True)
    classes = [FindingClass("nodule", findings.findings[0].finding_type)]
    samples: dict[str, list[float]] = {}
    storage = Path(tempfile.mkdtemp(prefix="results-bench-"))
    try:
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            headers = read_headers(paths)
            source = SourceImages.for_volume(volume.frames, headers, volume.series_instance_uid)
            uids = ResultUIDs(job_key("lung_nodule", "0.1.0", "chest-ct", headers))
            t1 = time.perf_counter()
            seg = build_seg(findings, source, producer, uids, WHEN, series_number=9901,
                            series_description="lung_nodule segmentation")  # fmt: skip
            t2 = time.perf_counter()
            regions = finding_regions(findings, volume.geometry)
            sr = build_sr(findings, source, list(source.datasets), producer, uids, WHEN, seg=seg,
                          procedure=CT_CHEST, series_number=9902, classes=classes, regions=regions,
                          pixel_spacing=volume.geometry.pixel_spacing,
                          series_description="lung_nodule findings")  # fmt: skip
            t3 = time.perf_counter()
            assert seg is not None
            write_objects(BuiltObjects((("SEG", "seg.dcm", seg.dataset), ("SR", "sr.dcm", sr)),
                                       {}), storage, 1)  # fmt: skip
            t4 = time.perf_counter()
            read_s, seg_s, sr_s, write_s = t1 - t0, t2 - t1, t3 - t2, t4 - t3
            for step, seconds in (("read source headers", read_s), ("build SEG", seg_s),
                                  ("build SR", sr_s), ("SEG + SR", seg_s + sr_s),
                                  ("write both files", write_s)):  # fmt: skip
                samples.setdefault(step, []).append(seconds)
        frames = int(seg.dataset.NumberOfFrames)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    out = {step: (values[0], statistics.median(values[1:])) for step, values in samples.items()}
    out["SEG frames (non-empty slices)"] = (float(frames), float(frames))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--nodules", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dicomnode-bench")
    args = parser.parse_args(argv)
    print(f"# results benchmark: {args.slices} x {ROWS} x {COLUMNS} CT, {args.nodules} nodules,"
          f" {args.runs} warm runs; {platform.processor() or platform.machine()},"
          f" Python {platform.python_version()}")  # fmt: skip
    tables = {}
    for layout, enhanced in (("single-frame", False), ("enhanced", True)):
        folder = args.out / f"results-chest-{args.slices}-{layout}"
        paths = phantom_series(folder, args.slices, args.nodules, enhanced)
        tables[layout] = measure(paths, folder, args.runs)
    steps = list(tables["single-frame"])
    print()
    print("| step | single-frame cold | single-frame warm | enhanced cold | enhanced warm |")
    print("|---|---|---|---|---|")
    for step in steps:
        cells = []
        for layout in ("single-frame", "enhanced"):
            cold, warm = tables[layout][step]
            cells += [f"{cold:.0f}", f"{warm:.0f}"] if "frames" in step else [
                f"{cold:.3f}", f"{warm:.3f}"]  # fmt: skip
        print(f"| {step} | " + " | ".join(cells) + " |")
    warm = max(tables[layout]["SEG + SR"][1] for layout in tables)
    print()
    print(f"SEG + SR (warm, worst layout): {warm:.3f} s; target < 1 s: "
          f"{'met' if warm < 1.0 else 'missed'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
