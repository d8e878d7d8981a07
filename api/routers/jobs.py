"""Background jobs: status, cancel and resume."""

from uuid import UUID

from django.http import HttpRequest
from ninja import Router

from api.auth import needs
from api.errors import ApiError
from api.schemas import ERRORS, JobOut
from jobs.control import JOB_NOT_FOUND, JobNotFound, JobStateError, cancel_job, resume_job
from jobs.models import Job

router = Router(tags=["jobs"])


@router.get(
    "/jobs/{job_id}",
    auth=needs("jobs.view_job"),
    response={200: JobOut, **ERRORS},
    url_name="job",
    summary="A background job: status, rows done of rows total, result when finished",
)
def job(request: HttpRequest, job_id: UUID):
    """Two queries: the job and its partitions' progress."""
    found = Job.objects.with_partitions().filter(pk=job_id).first()
    if found is None:
        raise ApiError(404, JOB_NOT_FOUND.format(job_id=job_id))
    return found.as_dict()


def _control(action, job_id: UUID) -> dict:
    """The job after ``action``: 404 for no such job, 409 when its status forbids it."""
    try:
        return action(job_id).as_dict()
    except JobNotFound as exc:
        raise ApiError(404, str(exc)) from exc
    except JobStateError as exc:
        raise ApiError(409, str(exc)) from exc


@router.post(
    "/jobs/{job_id}/cancel",
    auth=needs("jobs.change_job"),
    response={200: JobOut, **ERRORS},
    url_name="job_cancel",
    summary="Cancel a job: queued partitions never start, running ones stop after their chunk",
)
def cancel(request: HttpRequest, job_id: UUID):
    """Status ``cancelled``, or ``cancelling`` until the running partitions have stopped."""
    return _control(cancel_job, job_id)


@router.post(
    "/jobs/{job_id}/resume",
    auth=needs("jobs.change_job"),
    response={200: JobOut, **ERRORS},
    url_name="job_resume",
    summary="Resume a cancelled or failed job from its partitions' checkpoints",
)
def resume(request: HttpRequest, job_id: UUID):
    return _control(resume_job, job_id)
