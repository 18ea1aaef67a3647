"""The job queue: the repository (enqueue, claim, heartbeat, finish, retry), workers, periodic work.

``dicomnode.queue.worker`` (the worker loop and the model protocol) and
``dicomnode.queue.periodic`` (APScheduler) are imported from their modules, so code that only
enqueues (the receiver, completion, routing) loads neither threads' machinery nor APScheduler.
"""

from dicomnode.queue.repository import ClaimedJob, JobRecord, JobRepository

__all__ = ["ClaimedJob", "JobRecord", "JobRepository"]
