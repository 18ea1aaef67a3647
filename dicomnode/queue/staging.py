"""A run's result files in a private staging folder, published only while the run holds the lease.

A worker paused past its lease (SIGSTOP, a long GC pause, a network partition) wakes up and ends
its run after another worker has run the job again and finished it. Had it written into
``results/<job id>/``, it would rewrite the finished job's files. So every run writes into its own
folder, ``results/.staging/<job id>-<attempt>-<token>/``, laid out like the storage directory
(the job's files in ``results/<job id>/`` under it, so the paths the result records, relative
to the root, are the final ones), and :meth:`Staging.publish` moves them into place inside the
transaction that checks the lease (:meth:`JobRepository.finish`). A run without the lease
discards its folder.

The staging folders sit beside the results, on the same filesystem, so publishing is renames.
Folders left by a worker killed mid-run are removed by :func:`clean_staging`.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Job
from dicomnode.domain import JobState
from dicomnode.durable import fsync_dir
from dicomnode.errors import ResultsError

logger = logging.getLogger(__name__)

#: where jobs' files go under the storage directory (as dicomnode.inference.findings.RESULTS_DIR)
RESULTS_DIR = "results"
#: the runs' private folders, under RESULTS_DIR (never a job id, so retention passes them over)
STAGING_DIR = ".staging"
#: the earlier attempt's folder, moved aside into the staging root while the new one moves in
_REPLACED = "replaced"


@dataclass(frozen=True)
class Staging:
    """One run's private folder: ``root`` stands for the storage directory while it writes."""

    storage_dir: Path
    job_id: int
    root: Path

    @classmethod
    def for_run(cls, storage_dir: Path, job_id: int, attempt: int) -> Staging:
        """A new, unique folder name for this attempt of the job (created by whoever writes)."""
        name = f"{job_id}-{attempt}-{uuid.uuid4().hex[:12]}"
        return cls(storage_dir, job_id, storage_dir / RESULTS_DIR / STAGING_DIR / name)

    @property
    def folder(self) -> Path:
        """Where the run writes the job's files: ``<root>/results/<job id>/``."""
        return self.root / RESULTS_DIR / str(self.job_id)

    @property
    def target(self) -> Path:
        """Where they go: ``<storage>/results/<job id>/``."""
        return self.storage_dir / RESULTS_DIR / str(self.job_id)

    def publish(self) -> None:
        """Move the run's files into place, replacing an earlier attempt's folder whole (moved
        aside, the new one renamed in, the old removed). A run that wrote nothing changes
        nothing. Call it only while holding the job's lease, in the transaction that records
        the run (it is safe to call again after a rolled-back commit: the files have moved)."""
        if not self.folder.is_dir():
            return
        aside = self.root / _REPLACED
        try:
            replaced = self.target.exists()
            if replaced:
                os.rename(self.target, aside)
            try:
                os.rename(self.folder, self.target)
            except OSError:
                if replaced:  # put the earlier attempt's files back
                    os.rename(aside, self.target)
                raise
            fsync_dir(self.target.parent)
        except OSError as exc:
            raise ResultsError(
                f"job {self.job_id}: results could not be moved from {self.folder} "
                f"to {self.target}: {exc}"
            ) from exc
        self.discard()  # the earlier attempt's files, and the empty staging layout

    def discard(self) -> None:
        """Remove the folder and whatever is left in it (never raises)."""
        shutil.rmtree(self.root, ignore_errors=True)


def clean_staging(storage_dir: Path, sessions: sessionmaker[Session]) -> int:
    """Remove the staging folders no live run can publish: those whose job is not running at
    the attempt in their name (a worker killed mid-run, or one whose lease was taken). A live
    worker's folder stays. Returns how many were removed."""
    parent = storage_dir / RESULTS_DIR / STAGING_DIR
    try:
        folders = list(_runs(parent.iterdir()))  # listed before the query: see below
    except FileNotFoundError:
        return 0
    if not folders:
        return 0
    # A folder exists only after its run's claim committed; so a run listed above is either
    # still running at its attempt here, or has ended (and publishes or discards it itself).
    ids = {job_id for _, job_id, _ in folders}
    with sessions() as session:
        rows = session.execute(
            select(Job.id, Job.attempts).where(Job.id.in_(ids), Job.state == JobState.RUNNING.value)
        ).all()
    running = {(int(job_id), int(attempt)) for job_id, attempt in rows}
    removed = 0
    for folder, job_id, attempt in folders:
        if (job_id, attempt) not in running:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    if removed:
        logger.info(
            "removed %d staging folders of runs that ended without publishing",
            removed,
            extra={"action": "staging_cleaned"},
        )
    return removed


def _runs(entries: Iterable[Path]) -> Iterable[tuple[Path, int, int]]:
    """(folder, job id, attempt) of each staging folder with a name :meth:`Staging.for_run`
    gives; other entries are left alone."""
    for entry in entries:
        job_id, _, rest = entry.name.partition("-")
        attempt, _, token = rest.partition("-")
        if job_id.isdigit() and attempt.isdigit() and token and entry.is_dir():
            yield entry, int(job_id), int(attempt)
