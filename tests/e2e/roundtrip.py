"""The demo studies through a real PACS: scanner -> Orthanc -> (its auto-routing,
deploy/orthanc/autoroute.lua) -> dicomnode with the three models -> results -> Orthanc. Shared by
the end-to-end tests (test_pacs_roundtrip, test_ohif_demo)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicomnode.app import Node, build_node
from dicomnode.config import DEFAULT_ROUTES
from dicomnode.domain import FINAL_STATES
from dicomnode.phantoms.demo import DemoStudy
from dicomnode.queue.listing import JobFilter
from dicomnode.queue.records import JobRecord
from dicomnode.testing.models import MODELS as TEST_MODELS
from dicomnode.testing.orthanc import Orthanc
from dicomnode.testing.peers import storescu
from dicomnode.testing.waiting import wait_until
from tests.conftest import make_settings
from tests.helpers import port_of

REPO = Path(__file__).resolve().parents[2]
AUTOROUTE = REPO / "deploy" / "orthanc" / "autoroute.lua"
#: the three models, on CPU, on the demo studies: minutes
JOBS_TIMEOUT_S = 900


@dataclass(frozen=True)
class Roundtrip:
    pacs: Orthanc
    node: Node
    #: each study's job, ended, by Study Instance UID
    jobs: dict[str, JobRecord]


@contextmanager
def pacs_roundtrip(
    root: Path, studies: list[DemoStudy], *, dicomweb: bool = False
) -> Iterator[Roundtrip]:
    """Orthanc (with its DICOMweb plugin when asked) auto-routing to a node that runs the three
    models and sends its results back to Orthanc; each study sent to Orthanc by storescu and
    its job ended. Node and Orthanc stopped after."""
    pacs = Orthanc(root / "orthanc", lua_scripts=[AUTOROUTE], sync_storage=False, dicomweb=dicomweb)
    routes = [route.model_copy(update={"destinations": ("pacs",)}) for route in DEFAULT_ROUTES]
    settings = make_settings(
        root / "node",
        workers=[{"models": ["lung_nodule", "brain_tumor", "oct_grading"]}],
        routes=routes,
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
    )
    node = build_node(settings, builtin_models=TEST_MODELS)
    node.start(background=True)
    try:
        pacs.modalities["dicomnode"] = ("DICOMNODE", "127.0.0.1", port_of(node))
        pacs.start()
        for study in studies:  # the scanner sends to the PACS only
            sent = storescu(pacs.dicom_port, study.files, called_aet="ORTHANC")
            assert sent.returncode == 0, sent.stderr
        jobs = wait_until(
            lambda: (found := node.jobs.list(JobFilter(state=list(FINAL_STATES))))
            and len(found) == len(studies)
            and found,
            timeout=JOBS_TIMEOUT_S,
            what=f"the {len(studies)} jobs to end",
        )  # fmt: skip
        yield Roundtrip(pacs, node, {job.study_instance_uid: job for job in jobs})
    finally:
        pacs.stop(graceful=False)
        node.stop()


def wait_results_filed(roundtrip: Roundtrip, study: DemoStudy, timeout: float = 120) -> set[str]:
    """Wait until Orthanc holds every result object of the study's job under the study; their
    SOP Instance UIDs."""
    job = roundtrip.jobs[study.study_instance_uid]
    wanted = {o["sop_instance_uid"] for o in job.result["objects"]}
    wait_until(
        lambda: wanted <= {
            i["SOPInstanceUID"] for i in roundtrip.pacs.study_instances(study.study_instance_uid)
        },
        timeout=timeout,
        what=f"the {study.name} results in Orthanc",
    )  # fmt: skip
    return wanted
