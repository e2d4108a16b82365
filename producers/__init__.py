"""What other services use to enqueue remix jobs and read their outcome."""

from producers.api import enqueue_remix, get_job, wait_for_job
from worker.models import InvalidRequestError, JobRecord, JobState

__all__ = [
    "InvalidRequestError",
    "JobRecord",
    "JobState",
    "enqueue_remix",
    "get_job",
    "wait_for_job",
]
