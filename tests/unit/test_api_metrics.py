"""/metrics over a known job history, parsed as Prometheus parses it: every value is one the
history's stage times and rows decide (see dicomnode.testing.jobs.make_history)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from dicomnode.app import open_database
from dicomnode.config import Settings
from dicomnode.testing.jobs import api_server, make_history


@pytest.fixture(params=["sqlite", "postgresql"])
def samples(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, list[Sample]]:
    node: dict[str, object] = {"storage_dir": tmp_path, "min_free_disk_mb": 1}
    if request.param == "postgresql":
        request.applymarker(pytest.mark.postgres)
        node["database_url"] = request.getfixturevalue("clean_postgres_url")
    settings = Settings(node=node, api={"port": 0, "token": "t"})
    database = open_database(settings, migrate=True)
    make_history(database.sessions)
    with api_server(settings, database.sessions) as server:
        response = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer t"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = text_string_to_metric_families(response.text)
    return {family.name: family.samples for family in families}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    (found,) = [s.value for s in samples if s.name == name and s.labels == labels]
    return found


def test_received_and_associations(samples: dict[str, list[Sample]]) -> None:
    received = samples["dicomnode_received_instances"]
    assert value(received, "dicomnode_received_instances_total", result="stored") == 25
    assert value(received, "dicomnode_received_instances_total", result="refused") == 1
    associations = samples["dicomnode_associations"]
    assert value(associations, "dicomnode_associations_total", outcome="released") == 2
    assert value(associations, "dicomnode_associations_total", outcome="aborted") == 1


def test_jobs_by_state_and_queue_depth(samples: dict[str, list[Sample]]) -> None:
    jobs = {s.labels["state"]: s.value for s in samples["dicomnode_jobs"]}
    assert jobs == {"waiting": 1, "queued": 1, "running": 0, "confirming": 0, "review": 0,
                    "sending": 0, "done": 2, "failed": 1, "cancelled": 0, "skipped": 0,
                    "rejected": 0}  # fmt: skip
    depth = {(s.labels["state"], s.labels["model"]): s.value
             for s in samples["dicomnode_queue_depth"]}  # fmt: skip
    assert depth == {("waiting", "brain"): 1, ("queued", "lung"): 1}


def test_stage_durations_are_histograms_of_the_stage_times(
    samples: dict[str, list[Sample]],
) -> None:
    histogram = samples["dicomnode_job_stage_duration_seconds"]
    name = "dicomnode_job_stage_duration_seconds"

    def stage(model: str, stage: str) -> tuple[float, float, dict[str, float]]:
        labels = {"model": model, "stage": stage}
        buckets = {
            s.labels["le"]: s.value
            for s in histogram
            if s.name == f"{name}_bucket"
            and {k: v for k, v in s.labels.items() if k != "le"} == labels
        }
        return (value(histogram, f"{name}_count", **labels),
                value(histogram, f"{name}_sum", **labels), buckets)  # fmt: skip

    # lung run: done_lung 30 s, failed_lung 5 s (its last run)
    count, total, buckets = stage("lung", "run")
    assert (count, total) == (2, 35)
    assert (buckets["1"], buckets["5"], buckets["10"], buckets["30"], buckets["+Inf"]) == (
        0, 1, 1, 2, 2)  # fmt: skip
    # lung queue: done_lung 2 s, failed_lung queued at 90 s and last started at 200 s
    assert stage("lung", "queue")[:2] == (2, 112)
    assert stage("lung", "send")[:2] == (1, 8)
    assert stage("lung", "total")[:2] == (1, 50)
    # lung completion: 10 s for the series that waited, 0 for the two queued at once
    assert stage("lung", "completion")[:2] == (3, 10)
    assert stage("brain", "run")[:2] == (1, 60)
    assert stage("brain", "completion")[:2] == (1, 10)


def test_sends_and_free_disk(samples: dict[str, list[Sample]], tmp_path: Path) -> None:
    sends = {(s.labels["destination"], s.labels["state"]): s.value
             for s in samples["dicomnode_sends"]}  # fmt: skip
    assert sends == {("PACS", "sent"): 1, ("PACS", "dead"): 1}
    # 1 attempt delivered the SEG; the SR's 3 attempts all failed
    failures = samples["dicomnode_send_failures"]
    assert value(failures, "dicomnode_send_failures_total", destination="PACS") == 3
    free = value(samples["dicomnode_disk_free_bytes"], "dicomnode_disk_free_bytes")
    assert abs(free - shutil.disk_usage(tmp_path).free) < 512 * 2**20
