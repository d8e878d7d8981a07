"""``manage.py cancel_job JOB_ID``: stop a background job (see ``jobs.control``)."""

from __future__ import annotations

import uuid
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from jobs.control import JobNotFound, JobStateError, cancel_job
from jobs.models import RESUMABLE, Status

ENDED = "Job {job_id} is {status}: {done:,} of {total:,} rows done."
RESUME_LATER = " Resume it with resume_job."
CANCELLING = (
    "Job {job_id} is cancelling: {running} running partition(s) stop after the chunk "
    "they are writing ({done:,} of {total:,} rows done so far). Resume it with resume_job "
    "once its status is cancelled."
)


class Command(BaseCommand):
    help = (
        "Cancel a queued or running background job: its queued partitions never start, and "
        "each running partition commits the chunk it is writing, then stops (its run's log "
        "says cancelled). The job is cancelled at once, or 'cancelling' until its running "
        "partitions have stopped. Committed rows stay; `manage.py resume_job JOB_ID` goes on "
        "from each partition's checkpoint. A finished job is an error."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("job_id", type=uuid.UUID, metavar="JOB_ID", help="The job's id.")

    def handle(self, *args: Any, job_id: uuid.UUID, **options: Any) -> None:
        try:
            job = cancel_job(job_id)
        except (JobNotFound, JobStateError) as exc:
            raise CommandError(str(exc)) from exc
        partitions = job.progress_partitions()
        done = sum(partition.rows_done for partition in partitions)
        if options["verbosity"] < 1:
            return
        counts = {"job_id": job.pk, "done": done, "total": job.rows_total}
        if job.status == Status.CANCELLING:
            running = sum(partition.status == Status.RUNNING for partition in partitions)
            self.stdout.write(CANCELLING.format(running=running, **counts))
        else:  # cancelled; or failed, when a partition had failed before
            resume = RESUME_LATER if job.status in RESUMABLE else ""
            self.stdout.write(ENDED.format(status=job.status, **counts) + resume)
