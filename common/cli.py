"""What the management commands share: an argparse type and a terminal progress bar."""

from __future__ import annotations

import time
from argparse import ArgumentTypeError
from collections.abc import Iterable, Iterator

from django.core.management.base import OutputWrapper


def positive_int(value: str) -> int:
    """The argparse type of counts, sizes and durations: an integer of at least 1."""
    number = int(value)
    if number < 1:
        raise ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """A one-line terminal progress bar (rows, rows/s, time left) following the rows ``track``
    yields, with no hook in the engine; without a total, the count and rate only."""

    def __init__(
        self, out: OutputWrapper, total: int | None, *, interval: float = 0.2, width: int = 30
    ) -> None:
        self.out, self.total, self.interval, self.width = out, total, interval, width
        self.label = ""
        self.count = self._drawn = 0
        self.started = time.monotonic()
        self._next_draw = self.started + interval

    def track[T](self, rows: Iterable[T]) -> Iterator[T]:
        for row in rows:
            self.count += 1
            now = time.monotonic()
            if now >= self._next_draw:
                self._next_draw = now + self.interval
                self.draw(now)
            yield row

    def line(self, now: float) -> str:
        rate = self.count / max(now - self.started, 1e-6)
        counts = f"{self.count:,} rows  {rate:,.0f} rows/s"
        if not self.total:
            return f"{self.label}{counts}"
        total = max(self.total, self.count)  # the total is an estimate
        done = self.count / total
        filled = int(self.width * done)
        bar = "#" * filled + "." * (self.width - filled)
        left = format_seconds((total - self.count) / rate) if rate else "?"
        return (
            f"{self.label}[{bar}] {done:4.0%}  {self.count:,}/{total:,} rows  "
            f"{rate:,.0f} rows/s  {left} left"
        )

    def draw(self, now: float) -> None:
        text = self.line(now)
        # Padded to wipe the rest of a longer previous line.
        self.out.write("\r" + text.ljust(self._drawn), ending="")
        self.out.flush()
        self._drawn = len(text)

    def finish(self) -> None:
        if self.count:
            self.draw(time.monotonic())
            self.out.write("")
