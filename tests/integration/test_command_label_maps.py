"""A command model's NIfTI label map (``dicomnode`` contract) through the node's own worker: the
program reads the series' grid from job.json and writes a map with known blobs; the node checks
its grid, writes one SEG segment per label with voxels and an SR with each one's volume, or
fails the job naming the wrong grid, the unknown label or the file that is no NIfTI."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.app import Node
from dicomnode.domain import JobState
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.validators import dciodvfy, has_tool
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of
from tests.integration.test_results_objects import texts

ROOT = Path(__file__).resolve().parents[2]

#: the test's command model: argv[1] out/, argv[2] what to do; the series' grid from job.json
PROGRAM = r"""
import json, sys
from pathlib import Path

import nibabel as nib
import numpy as np

out, mode = Path(sys.argv[1]), sys.argv[2]
job = json.loads(Path("job.json").read_text())  # the cwd is the job's folder
grid = job["series"][0]["grid"]
affine = np.array(grid["affine_ras"])
data = np.zeros(grid["shape"], dtype=np.uint8)  # [column, row, slice]
if mode != "empty":
    data[4:12, 6:14, 1:3] = 1  # 128 voxels: "liver", named by the model's labels setting
    data[20:24, 20:25, 2:5] = 2  # 60 voxels: named with a code in labels.json
if mode == "unknown":
    data[0, 0, 0] = 7
counts = {str(v): int((data == v).sum()) for v in (1, 2)}
Path("expected.json").write_text(json.dumps(counts))
if mode == "turned":  # the same map, columns reversed and rows and slices swapped
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    data, affine = np.flip(data, 0).transpose(0, 2, 1), affine @ flip @ np.eye(4)[[0, 2, 1, 3]]
elif mode == "shifted":
    affine[:3, 3] += [0.0, 0.0, 3.0]  # 3 mm towards the head
if mode == "garbage":
    (out / "labels.nii.gz").write_bytes(b"no NIfTI at all" * 30)
else:
    nib.save(nib.Nifti1Image(data, affine), str(out / "labels.nii.gz"))
neoplasm = {"value": "108369006", "scheme": "SCT", "meaning": "Neoplasm"}
(out / "labels.json").write_text(json.dumps({"2": {"name": "lesion", "code": neoplasm}}))
"""

MODES = ("good", "turned", "empty", "shifted", "unknown", "garbage")


def _segment_voxels(path: Path) -> dict[str, int]:
    """Each segment's voxel count, by its label, from the SEG's frames."""
    ds = dcmread(path)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    counts = dict.fromkeys(labels.values(), 0)
    for frame, group in zip(pixels, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[labels[number]] += int(np.count_nonzero(frame))
    return counts


@pytest.mark.slow
def test_label_maps_become_the_nodes_seg_and_sr(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    commands = {
        f"map_{mode}": {
            "command": [sys.executable, str(script), "{output}", mode],
            "environment": {"PYTHONPATH": str(ROOT)},
            "labels": {1: "liver"},
        }
        for mode in MODES
    }
    node = start_node(
        models={"commands": commands},
        workers=[{"models": sorted(commands)}],
        queue={"max_attempts": 1},
    )
    spec = SeriesSpec(slices=6, rows=32, columns=32, seed=73)
    files = write_series(list(ct_slices(spec)), tmp_path / "ct")
    assert peers.storescu(port_of(node), files).returncode == 0
    first = dcmread(files[0])
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    for mode in MODES:
        node.jobs.enqueue(
            dedupe_key=f"map/{mode}",
            route="commands",
            model=f"map_{mode}",
            study_instance_uid=study,
            inputs=[series],
            state=JobState.QUEUED,
        )
    wait_until(
        lambda: all(j.final for j in node.jobs.list(limit=50)),
        timeout=180,
        interval=0.2,
        what="every label map job to end",
    )
    jobs = {j.model.removeprefix("map_"): j for j in node.jobs.list(limit=50)}
    voxel_mm3 = spec.pixel_mm * spec.pixel_mm * spec.spacing_mm
    centres = {}
    for mode in ("good", "turned"):
        job = jobs[mode]
        assert job.state is JobState.DONE, (mode, job.error)
        assert job.result is not None
        folder = node.spool.root / "results" / str(job.id) / "command"
        expected = {
            {"1": "liver", "2": "lesion"}[v]: n
            for v, n in json.loads((folder / "expected.json").read_text()).items()
        }
        assert expected == {"liver": 128, "lesion": 60}
        assert job.result["summary"]["voxels"] == expected
        found = {f["label"]: f for f in job.result["findings"]}
        assert {k: f["volume_mm3"] for k, f in found.items()} == pytest.approx(
            {k: n * voxel_mm3 for k, n in expected.items()}, abs=1e-2
        )
        assert found["lesion"]["finding_type"]["value"] == "108369006"
        centres[mode] = {k: f["centre_mm"] for k, f in found.items()}
        kinds = {o["kind"]: node.spool.root / o["path"] for o in job.result["objects"]}
        assert sorted(kinds) == ["KO", "SC", "SEG", "SR"]  # SC: key images
        assert _segment_voxels(kinds["SEG"]) == expected
        seg = dcmread(kinds["SEG"])
        assert str(seg.StudyInstanceUID) == study
        assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver", "lesion"]
        sr = dcmread(kinds["SR"])
        said = texts(sr)  # each finding in words, as OHIF lists it
        assert any(text.startswith("Lesion: 37 mm3, p=") for text in said), said
        if has_tool("dciodvfy"):
            for path in kinds.values():
                report = dciodvfy(path)
                assert not report.errors, report.output
    # the map turned on its grid is the same map
    assert centres["turned"] == centres["good"]
    # no label anywhere: done, an SR that finds none, no SEG
    empty = jobs["empty"]
    assert empty.state is JobState.DONE, empty.error
    assert empty.result is not None and empty.result["findings"] == []
    assert [o["kind"] for o in empty.result["objects"]] == ["SR", "SC", "KO"]  # "no ... found"
    reasons = {
        "shifted": rf"out/labels\.nii\.gz is not on the grid of series {re.escape(series)}: its "
        r"voxels lie up to 3\.000 mm from the series'",
        "unknown": r"out/labels\.nii\.gz holds label value\(s\) \[7\], named neither in "
        r"out/labels\.json nor in the model's labels setting \(named: \[1, 2\]\)",
        "garbage": r"out/labels\.nii\.gz is not a NIfTI label map nibabel can read",
    }
    for mode, reason in reasons.items():
        job = jobs[mode]
        assert job.state is JobState.FAILED, (mode, job.state)
        assert job.error is not None and re.search(reason, job.error), (mode, job.error)
        assert not (node.spool.root / "results" / str(job.id)).exists(), mode
