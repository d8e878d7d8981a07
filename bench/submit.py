"""The benchmark behind ``manage.py bench_submit``: staging a catalogue as a job.

Per size, ``import_products PATH --background`` runs in a fresh child process, beside
two limits timed in the parent on the COPY alone. Method: docs/benchmarks.md.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

from django.core.management import call_command
from django.db import DEFAULT_DB_ALIAS, connections, transaction

from batching.postgres import copy_text
from bench.namespace import vacuum
from bench.report import (
    BenchError,
    format_ratio,
    growth_mb,
    markdown_table,
    memory_baseline,
    run_child,
    section_head,
    short_size,
)
from bench.workloads import ImportWorkload, copy_in, temp_table
from jobs.models import Job, StagedRecord
from jobs.staging import FIELDS, copy_block

TITLE = "Submitting a catalogue as a background job"
RAW_TABLE = "bench_submit_lines"
BLOCK_ROWS = 16_000  # lines per write of the table COPY: about a block of the reader's
SUBMITTED = re.compile(r"Submitted job ([0-9a-f-]{36})")


@dataclass(frozen=True, slots=True)
class Submitted:
    size: int
    seconds: float
    growth_mb: float
    raw_seconds: float
    table_seconds: float


def submitted_job(output: str) -> str:
    """The id of the job ``import_products --background`` said it submitted."""
    found = SUBMITTED.search(output)
    if found is None:
        raise BenchError(f"the submit named no job: {output.strip()[-300:]}")
    return found.group(1)


def submit_here(path: Path) -> dict[str, float | str]:
    """In the child: submit ``path`` as a background import; its job, time and memory growth."""
    baseline, output = memory_baseline(), StringIO()
    started = time.perf_counter()
    call_command("import_products", str(path), "--background", stdout=output)
    seconds, job = time.perf_counter() - started, submitted_job(output.getvalue())
    return {"job": job, "seconds": seconds, "growth_mb": growth_mb(baseline)}


def raw_copy_seconds(path: Path, using: str) -> float:
    """COPY the file's lines as text into a temporary table: the staging's raw limit."""
    with transaction.atomic(using=using), open(path, encoding="utf-8") as lines:
        temp_table(using, RAW_TABLE, "line text")
        next(lines)  # the header
        table = connections[using].ops.quote_name(RAW_TABLE)
        started = time.perf_counter()
        records = ((line.rstrip("\n"),) for line in lines)
        copy_in(using, f"COPY {table} (line) FROM STDIN", records)
        return time.perf_counter() - started


def table_copy_seconds(path: Path, using: str) -> float:
    """COPY the file's lines, numbered, into the staged-records table itself, rolled
    back: what storing them costs (its index, its WAL), the text made beforehand."""
    job = uuid.uuid4()
    with open(path, encoding="utf-8", newline="") as lines:
        next(lines)  # the header
        records = [line.removesuffix("\n") for line in lines]
    blocks = [
        copy_block(job, start, records[start : start + BLOCK_ROWS], plain=False)
        for start in range(0, len(records), BLOCK_ROWS)
    ]
    del records
    vacuum(using, [StagedRecord], "VACUUM")
    with transaction.atomic(using=using):
        started = time.perf_counter()
        copy_text(StagedRecord, FIELDS, blocks, using=using)
        seconds = time.perf_counter() - started
        transaction.set_rollback(True, using=using)
    return seconds


def run_submit_bench(sizes: list[int], work_dir: Path, using: str = DEFAULT_DB_ALIAS) -> list:
    paths = [ImportWorkload(size, work_dir=work_dir, using=using).input_file() for size in sizes]
    # Every child first: a child forked from this process once it has held a
    # table COPY's text would count this process's size as its own peak.
    children = []
    for path in paths:
        vacuum(using, [StagedRecord], "VACUUM")  # each COPY meets the same table
        child = run_child(f"submitting {path.name}", using, "bench_submit", "--child", str(path))
        # Only this job: the database may hold others (a shop's, another benchmark's).
        Job.objects.using(using).filter(pk=child["job"]).delete()
        children.append(child)
    return [
        Submitted(
            size=size,
            seconds=child["seconds"],
            growth_mb=child["growth_mb"],
            raw_seconds=raw_copy_seconds(path, using),
            table_seconds=table_copy_seconds(path, using),
        )
        for size, path, child in zip(sizes, paths, children, strict=True)
    ]


def markdown(results: list[Submitted], command_line: str) -> str:
    rows = []
    for r in results:
        limits = (
            (f"{r.size / limit:,.0f}", format_ratio(limit / r.seconds))
            for limit in (r.raw_seconds, r.table_seconds)
        )
        rate = (short_size(r.size), f"{r.seconds:.2f} s", f"{r.size / r.seconds:,.0f}")
        rows.append((*rate, *(cell for pair in limits for cell in pair), f"{r.growth_mb:.1f} MB"))
    header = ("Rows", "Submit", "Rows/s", "Raw COPY rows/s", "÷ raw", "Table COPY rows/s",
              "÷ table", "Peak memory growth")  # fmt: skip
    return "\n".join(
        [
            *section_head(TITLE, command_line),
            "`import_products PATH --background` in a fresh process: the file read once and "
            "split into records, the records COPYed unparsed into the job's staged input (the "
            "workers parse them), the partitions named, committed. *Raw COPY* is the same "
            "file's lines COPYed as text into a temporary table without an index; *table COPY* "
            "is the same lines, numbered, COPYed into the staged-records table itself (its "
            "primary key, its WAL; the text made beforehand, rolled back). Memory is the "
            "child's peak resident size above its size once Django was set up.",
            "",
            *markdown_table(header, "lrrrrrrr", rows),
        ]
    )
