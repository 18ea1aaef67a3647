"""``dicomnode demo`` against ``dicomnode serve`` on its embedded defaults, as the README's
walkthrough runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomnode.testing.peers import free_port
from dicomnode.testing.process import ServeProcess, cli


@pytest.mark.slow
def test_demo_sends_phantoms_and_reports_the_findings(tmp_path: Path) -> None:
    node = ServeProcess(tmp_path / "node")
    node.env["DICOMNODE_API__PORT"] = str(free_port())
    node.start()
    try:
        result = cli("demo", "--studies", "retina", "--json", "--timeout", "300", env=node.env)
    finally:
        node.stop()
    assert result.returncode == 0, result.stderr[-2000:]
    (outcome,) = json.loads(result.stdout)
    assert outcome["name"] == "retina" and outcome["model"] == "oct_grading"
    (job,) = outcome["jobs"]
    assert job["state"] == "done" and job["route"] == "retina"
    grade = next(f for f in job["result"]["findings"] if f["label"] == "dr_grade")
    assert grade["attributes"]["grade"] == 3  # the demo's OCT phantom is drawn at grade 3
    assert {o["kind"] for o in job["result"]["objects"]} >= {"SR", "SC"}
    assert outcome["waited_s"] > 0
