"""Background job status."""

from uuid import UUID

from django.http import HttpRequest
from ninja import Router

from api.auth import needs
from api.errors import ApiError
from api.schemas import ERRORS, JobOut
from jobs.models import Job

router = Router(tags=["jobs"])

JOB_NOT_FOUND = "no job {job_id}"


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
