"""``manage.py resume_job JOB_ID``: go on with a cancelled or failed job (see ``jobs.control``)."""

from __future__ import annotations

import uuid
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from jobs.control import JobNotFound, JobStateError, resume_job

RESUMED = "Job {job_id} queued again: {count} partition(s) resume from their checkpoints."


class Command(BaseCommand):
    help = (
        "Resume a cancelled or failed background job: its cancelled and failed partitions "
        "are queued again, and the workers resume each from its checkpoint, so every row "
        "lands exactly once. Completed partitions are not run again."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("job_id", type=uuid.UUID, metavar="JOB_ID", help="The job's id.")

    def handle(self, *args: Any, job_id: uuid.UUID, **options: Any) -> None:
        try:
            job = resume_job(job_id)
        except (JobNotFound, JobStateError) as exc:
            raise CommandError(str(exc)) from exc
        if options["verbosity"] >= 1:
            count = job.partitions.filter(status=job.Status.QUEUED).count()
            self.stdout.write(RESUMED.format(job_id=job.pk, count=count))
