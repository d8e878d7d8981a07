"""What every benchmark report shares: the machine and database, number formats, tables."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Sequence

from django.db import DEFAULT_DB_ALIAS, connections
from django.utils import timezone


def short_size(size: int) -> str:
    for unit, suffix in ((1_000_000, "M"), (1_000, "k")):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def format_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def machine_description() -> str:
    """CPU model, cores, memory, OS and Python: enough to compare runs."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        memory_text = f", {memory:.1f} GiB RAM"
    except (ValueError, OSError):
        memory_text = ""
    return (
        f"{model}, {os.cpu_count()} CPUs{memory_text}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def markdown_table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """``align``: one character per column, ``l`` or ``r``."""
    marks = [" --- " if a == "l" else " ---: " for a in align]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(marks) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def format_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def format_speedup(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}x"


def database_description(using: str = DEFAULT_DB_ALIAS) -> str:
    """'postgresql (PostgreSQL 15.8)': the vendor, and the server version when known."""
    connection = connections[using]
    try:
        version = ".".join(str(part) for part in connection.get_database_version())
    except NotImplementedError:
        return connection.vendor
    return f"{connection.vendor} ({connection.display_name} {version})"


def section_head(
    title: str, command_line: str, database: str | None = None, date: str | None = None
) -> list[str]:
    """A BENCHMARKS.md section's first lines: its title, how to re-run it, where and when.

    ``database`` defaults to the default database's description, ``date`` to today.
    """
    database = database or database_description()
    date = date or timezone.now().date().isoformat()
    return [
        f"## {title}",
        "",
        f"Command: `{command_line}`",
        "",
        f"Machine: {machine_description()}  ",
        f"Database: {database}  ",
        f"Date: {date}",
        "",
    ]
