"""What other services use to enqueue remix jobs and read their outcome."""

from producers.api import JobNotCancellable, cancel_job, enqueue_remix, get_job, wait_for_job
from producers.retry import JobNotRetryable, retry_job
from worker.models import InvalidRequestError, JobRecord, JobState
from worker.store.jobs import QueueFull

__all__ = [
    "InvalidRequestError",
    "JobNotCancellable",
    "JobNotRetryable",
    "JobRecord",
    "JobState",
    "QueueFull",
    "cancel_job",
    "enqueue_remix",
    "get_job",
    "retry_job",
    "wait_for_job",
]
