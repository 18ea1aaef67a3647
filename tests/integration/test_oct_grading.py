"""The oct_grading model through the whole job path: a node with a retina route and a worker
running the model; an OCT cube sent with dcmtk's storescu and a JPEG fundus photograph with the
node's own SCU; each series routed, graded, and its attention map written beside the spool."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from dicomnode.app import Node
from dicomnode.domain import JobState
from dicomnode.inference.findings import read_mask
from dicomnode.phantoms.retina import fundus_photo, oct_volume
from dicomnode.send.scu import Destination, send_files
from dicomnode.testing import peers
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

MODELS = Path(__file__).resolve().parents[2] / "models"

pytestmark = pytest.mark.slow


def test_oct_and_fundus_series_are_graded_by_the_nodes_worker(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(
        models={"dirs": [MODELS]},
        workers=[{"models": ["oct_grading"]}],
        routes=[
            {
                "name": "retina",
                "model": "oct_grading",
                "match": {"Modality": ["OPT", "OP"]},
                "completion": {"quiet_s": 0.5, "release_grace_s": 0.2, "confirm_s": 0},
            }
        ],
    )
    cube = oct_volume(4, seed=5401)
    photo = fundus_photo(2, seed=5402)
    sent = peers.storescu(port_of(node), cube.write(tmp_path / "oct"))
    assert sent.returncode == 0, sent.stderr
    results = send_files(photo.write(tmp_path / "fundus", jpeg=True),
                         Destination("DICOMNODE", "127.0.0.1", port_of(node)))  # fmt: skip
    assert all(r.ok for r in results), results

    jobs = wait_until(
        lambda: (
            len(found := node.jobs.list(limit=10)) == 2 and all(j.final for j in found) and found
        ),
        timeout=180,
        interval=0.5,
        what="both jobs' ends",
        detail=lambda: [(j.id, j.state) for j in node.jobs.list(limit=10)],
    )
    assert len(jobs) == 2 and all(job.final for job in jobs), [(j.id, j.state) for j in jobs]
    by_kind = {}
    for job in jobs:
        assert job.state is JobState.DONE, job.error
        assert job.result is not None
        by_kind[job.result["summary"]["kind"]] = job.result
    expected = {"oct": (4, (25, 128, 128)), "fundus": (2, (1, 384, 384))}
    for kind, (grade, shape) in expected.items():
        result = by_kind[kind]
        assert result["summary"]["grade"] == grade
        (finding,) = [f for f in result["findings"] if f["label"] == "dr_grade"]
        assert finding["attributes"]["grade"] == grade
        (described,) = result["inputs"]
        assert described["shape"][:3] == list(shape)
        mask = result["masks"]["attention"]
        assert mask["shape"] == list(shape) and mask["dtype"] == "uint8"
        assert read_mask(node.spool.root / mask["path"]).shape == shape
        # the results package turned the map into a Secondary Capture overlay (and an SR)
        objects = {o["kind"]: o for o in result.get("objects", [])}
        assert "SC" in objects, result.get("objects")
        assert (node.spool.root / objects["SC"]["path"]).is_file()
