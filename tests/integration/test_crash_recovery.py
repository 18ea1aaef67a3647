"""A node killed with SIGKILL in the middle of a model run: after a restart the job runs again
to its end, and the PACS holds each result exactly once (the results' UIDs are derived from the
job's input, so the second run's objects are the first run's)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dicomnode.app import open_database
from dicomnode.config import load_settings
from dicomnode.domain import JobState
from dicomnode.phantoms.chest import chest_ct
from dicomnode.queue import JobRepository
from dicomnode.queue.listing import JobFilter
from dicomnode.testing.orthanc import orthanc
from dicomnode.testing.peers import LOOPBACK, storescu
from dicomnode.testing.process import ServeProcess
from dicomnode.testing.waiting import wait_until

CONFIG = """
[node]
storage_dir = "{storage}"

[queue]
lease_s = 4          # a killed worker's job is claimed again after this
heartbeat_s = 1

[[workers]]
models = ["lung_nodule"]

[[routes]]
name = "chest"
model = "lung_nodule"
destinations = ["pacs"]
match = {{ Modality = "CT" }}
completion = {{ quiet_s = 30, release_grace_s = 1, confirm_s = 0 }}

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "{host}"
port = {port}
backoff_s = 1
"""


@pytest.mark.slow
def test_sigkill_during_inference_then_each_result_reaches_the_pacs_once(tmp_path: Path) -> None:
    phantom = chest_ct((64, 256, 256), (1.2, 1.2, 2.0), nodules=2, seed=4301, sizes=(8.0, 14.0))
    series = phantom.write(tmp_path / "chest")
    storage = tmp_path / "node"
    with orthanc(tmp_path / "orthanc", sync_storage=False, graceful_stop=False) as pacs:
        config = tmp_path / "node.toml"
        config.write_text(CONFIG.format(storage=storage, host=LOOPBACK, port=pacs.dicom_port))
        settings = load_settings(config)
        serve = ServeProcess(storage, config=config).start()
        database = open_database(settings, migrate=False)
        jobs = JobRepository(database.sessions, settings.queue)
        try:
            assert storescu(serve.port, series).returncode == 0
            job = wait_until(
                lambda: next(iter(jobs.list(JobFilter(state=["running"]))), None),
                timeout=120,
                what="the job to run",
            )
            serve.kill()  # mid-inference: the model was loaded and is running
            assert jobs.get(job.id).state is JobState.RUNNING  # type: ignore[union-attr]
            serve.start()  # the same storage and port: its lease runs out and the job reruns
            done = wait_until(
                lambda: (j := jobs.get(job.id)) and j.state in (JobState.DONE, JobState.FAILED)
                and j,
                timeout=300,
                what="the rerun to end",
            )  # fmt: skip
            assert done.state is JobState.DONE, done.error
            assert done.attempts == 2  # the killed run and the rerun
            objects = done.result["objects"]
            assert {o["study_instance_uid"] for o in objects} == {done.study_instance_uid}
            held = Counter(
                i["SOPInstanceUID"] for i in pacs.study_instances(done.study_instance_uid)
            )
            assert set(held) == {o["sop_instance_uid"] for o in objects}  # all, and nothing else
            assert all(count == 1 for count in held.values())
            assert pacs.instance_count() == len(objects)
        finally:
            serve.stop()
            database.engine.dispose()
