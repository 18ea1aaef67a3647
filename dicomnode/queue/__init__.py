"""The node's durable queues in the database: the jobs (``repository``: enqueue, claim under a
lease, heartbeat, finish, retry; ``records`` and ``listing`` for what it returns and finds) and
the sends that a finished job leaves (``sends``), with the worker loop and the periodic upkeep.

``dicomnode.queue.worker`` (the worker loop and the model protocol) and
``dicomnode.queue.periodic`` (APScheduler) are imported from their modules, so code that only
enqueues (the receiver, completion, routing) loads neither threads' machinery nor APScheduler.
"""

from dicomnode.queue.listing import JobFilter
from dicomnode.queue.records import ClaimedJob, JobRecord
from dicomnode.queue.repository import JobRepository

__all__ = ["ClaimedJob", "JobFilter", "JobRecord", "JobRepository"]
