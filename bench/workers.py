"""The benchmark behind ``manage.py bench_workers``: one job, 1, 2 and 4 workers.

Per backend and worker count: the catalogue import's base state, the workers (each in a
directory of its own), the catalogue submitted with ``import_products PATH --background``,
the job awaited. Method: docs/benchmarks.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from django.conf import settings
from django.db.models import Min

from bench.namespace import reset_namespace
from bench.report import BenchError, markdown_table, section_head, short_size
from bench.server import database_url
from bench.submit import submitted_job
from bench.workloads import ImportWorkload
from jobs.models import FINISHED, Job

TITLE = "Scaling out: one catalogue job on 1, 2 and 4 workers"
BACKENDS = ("db", "celery")
QUEUE = "bench_workers"
READY = {"db": "Starting worker", "celery": " ready."}
START_TIMEOUT = 120.0
JOB_TIMEOUT = 3600.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def backend_environment(backend: str) -> dict[str, str]:
    if backend == "celery":
        return {"TASKS_BACKEND": settings.TASKS_BACKEND_CELERY, "CELERY_QUEUE": QUEUE}
    return {"TASKS_BACKEND": "django_tasks_db.DatabaseBackend"}


def worker_command(backend: str, number: int) -> list[str]:
    if backend == "celery":
        # Each worker a node of its own name: two nodes of one name refuse each other.
        return [sys.executable, "-m", "celery", "--app", "jobs.celery", "worker",
                "--hostname", f"bench-{number}@%h", "--pool", "prefork", "--concurrency", "1",
                "--loglevel", "INFO", "--queues", QUEUE]  # fmt: skip
    manage = str(Path(settings.BASE_DIR) / "manage.py")
    return [sys.executable, manage, "db_worker", "--no-startup-delay", "--interval", "0.2"]


@dataclass
class Worker:
    process: subprocess.Popen
    log: Path


def start_workers(backend: str, count: int, environment: dict[str, str]) -> list[Worker]:
    """``count`` workers, each in a fresh directory and a session of its own; once ready."""
    workers = []
    for number in range(count):
        directory = Path(tempfile.mkdtemp(prefix=f"bench-worker-{backend}-{number}-"))
        log = directory / "worker.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                worker_command(backend, number),
                cwd=directory,
                env=environment | {"PYTHONPATH": str(settings.BASE_DIR)},
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        workers.append(Worker(process, log))
    deadline = time.monotonic() + START_TIMEOUT
    for worker in workers:
        while READY[backend] not in worker.log.read_text(errors="replace"):
            if worker.process.poll() is not None or time.monotonic() > deadline:
                stop_workers(workers)
                tail = worker.log.read_text(errors="replace")[-500:]
                raise BenchError(f"a {backend} worker did not start: {tail}")
            time.sleep(0.1)
    return workers


def stop_workers(workers: list[Worker]) -> None:
    for worker in workers:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(worker.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                worker.process.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (which may hold spaces); None once gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of ``pids`` and of their children that have exited.

    A child's time is added to its parent's when the parent reaps it: the
    connections PostgreSQL served and closed count in the postmaster's, a
    Celery pool child's in its worker's.
    """
    found = [fields for pid in pids if (fields := stat_fields(pid)) is not None]
    # utime, stime, cutime, cstime
    return sum(int(value) for fields in found for value in fields[11:15]) / CLOCK_TICKS


def pids_where(test: Callable[[int], bool]) -> list[int]:
    """The live processes that pass ``test`` (one that is gone meanwhile does not)."""
    found = []
    for pid in (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()):
        try:
            if test(pid):
                found.append(pid)
        except OSError:
            continue
    return found


def processes(matching: str) -> list[int]:
    """The live processes whose command line contains ``matching``."""
    return pids_where(
        lambda pid: matching in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    )


def session_pids(workers: list[Worker]) -> list[int]:
    """Every live process in the workers' sessions (Celery's pool children too)."""
    sessions = {worker.process.pid for worker in workers}
    return pids_where(  # field 3: the session id
        lambda pid: (fields := stat_fields(pid)) is not None and int(fields[3]) in sessions
    )


def machine_busy() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def counters(workers: list[Worker]) -> tuple[float, float, int, int]:
    """The workers' and PostgreSQL's CPU seconds, the machine's busy and total ticks."""
    return cpu_seconds(session_pids(workers)), cpu_seconds(processes("postgres")), *machine_busy()


@dataclass(frozen=True, slots=True)
class ScaleOut:
    backend: str
    workers: int
    rows: int
    staging_seconds: float
    seconds: float
    worker_cpu: float
    database_cpu: float
    busy: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds


def submit(path: Path, environment: dict[str, str]) -> tuple[str, float]:
    """``import_products PATH --background`` in a child with the backend's settings."""
    command = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "import_products"]
    started = time.perf_counter()
    run = partial(subprocess.run, env=environment, capture_output=True, text=True, check=False)
    child = run([*command, str(path), "--background"])
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise BenchError(f"the submit failed: {child.stderr.strip()[-500:]}")
    return submitted_job(child.stdout), seconds


def run_once(workload: ImportWorkload, backend: str, count: int) -> ScaleOut:
    workload.setup()  # the base state: half the skus exist
    path = workload.input_file()
    environment = dict(os.environ, DATABASE_URL=database_url(workload.using))
    environment |= backend_environment(backend)
    workers = start_workers(backend, count, environment)
    try:
        job_id, staging = submit(path, environment)
        # From here on the workers run the job (they may have begun a moment before).
        before = counters(workers)
        deadline = time.monotonic() + JOB_TIMEOUT
        while (
            status := Job.objects.filter(pk=job_id).values_list("status", flat=True).first()
        ) not in FINISHED:
            if status is None:
                raise BenchError(f"job {job_id} is gone: something else deleted it")
            if time.monotonic() > deadline:
                raise BenchError(f"job {job_id} did not end within {JOB_TIMEOUT:.0f} s")
            time.sleep(0.2)
        worker_cpu, database_cpu, busy, total = (
            after - first for after, first in zip(counters(workers), before, strict=True)
        )
    finally:
        stop_workers(workers)
    job = Job.objects.get(pk=job_id)
    if job.status != "completed":
        raise BenchError(f"job {job_id} ended {job.status}")
    started = job.partitions.aggregate(first=Min("claimed_at"))["first"]
    seconds = (job.finished_at - started).total_seconds()
    job.delete()  # its staged rows and partitions go with it
    return ScaleOut(
        backend=backend,
        workers=count,
        rows=job.rows_total,
        staging_seconds=staging,
        seconds=seconds,
        worker_cpu=worker_cpu,
        database_cpu=database_cpu,
        busy=busy / max(1, total),
    )


def run_scale_out(
    size: int, backends: list[str], counts: list[int], work_dir: Path, using: str = "default"
) -> list[ScaleOut]:
    workload = ImportWorkload(size, work_dir=work_dir, using=using)
    results = [run_once(workload, backend, count) for backend in backends for count in counts]
    reset_namespace(using)
    return results


def markdown(results: list[ScaleOut], command_line: str) -> str:
    base = {r.backend: r.rows_per_second for r in results if r.workers == 1}
    rows = []
    for r in results:
        speedup = f"{r.rows_per_second / base[r.backend]:.2f}x" if r.backend in base else "n/a"
        times, cpu = (
            [f"{s:.1f} s" for s in pair]
            for pair in ((r.staging_seconds, r.seconds), (r.worker_cpu, r.database_cpu))
        )
        first = (r.backend, str(r.workers), short_size(r.rows), *times)
        rows.append((*first, f"{r.rows_per_second:,.0f}", speedup, *cpu, f"{r.busy:.0%}"))
    header = ("Backend", "Workers", "Rows", "Staging", "Run", "Rows/s", "÷ 1 worker",
              "Workers' CPU", "PostgreSQL CPU", "Machine busy")  # fmt: skip
    return "\n".join(
        [
            *section_head(TITLE, command_line),
            "The database and the workers share the machine. A catalogue "
            "job (half the skus exist) submitted with `import_products PATH --background`; "
            "*Run* is from its first partition's claim to its end, *Staging* the submit "
            "before it. CPU seconds are the workers' (pool children included) and "
            "PostgreSQL's (its closed connections included) from the end of the submit to "
            "the end of the job; *Machine busy* is the share of all CPUs in use then.",
            "",
            *markdown_table(header, "lrrrrrrrrr", rows),
            "",
            *bottleneck_lines(results),
        ]
    )


def bottleneck_lines(results: list[ScaleOut]) -> list[str]:
    """Where the time went, per backend: the database's share of the CPU, the machine's use."""
    lines = []
    for backend in dict.fromkeys(r.backend for r in results):
        runs = sorted((r for r in results if r.backend == backend), key=lambda r: r.workers)
        first, last = runs[0], runs[-1]
        share = last.database_cpu / ((last.database_cpu + last.worker_cpu) or 1)
        lines.append(
            f"{backend}: at {first.workers} worker(s) the machine was {first.busy:.0%} busy; at "
            f"{last.workers}, {last.busy:.0%}, {last.rows_per_second / first.rows_per_second:.2f}x "
            f"the rows/s, with PostgreSQL taking {share:.0%} of the CPU the run used.  "
        )
    return lines
