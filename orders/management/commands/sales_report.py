"""``manage.py sales_report [--since DATE] [--until DATE] [--csv PATH]``: the figures of
``orders.reports.sales_report`` and, with ``--csv``, every order line of the range."""

from __future__ import annotations

from argparse import ArgumentParser, ArgumentTypeError
from datetime import date
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from orders.reports import SalesReport, check_range, iter_order_lines_csv, sales_report

CANNOT_WRITE = "cannot write {path}: {error}"
BAD_DATE = "{value!r} is not a date (expected YYYY-MM-DD)"


def iso_date(value: str) -> date:
    """A ``YYYY-MM-DD`` day, for argparse (which shows only ArgumentTypeError's message)."""
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ArgumentTypeError(BAD_DATE.format(value=value)) from None


class Command(BaseCommand):
    help = (
        "Sales figures (orders, revenue, average order value, units and revenue per "
        "product and per day) for a range of days, cancelled orders left out; "
        "optionally every order line as CSV."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        for option, which in (("--since", "First"), ("--until", "Last")):
            parser.add_argument(
                option,
                type=iso_date,
                metavar="DATE",
                help=f"{which} day included, YYYY-MM-DD (default: no limit).",
            )
        parser.add_argument(
            "--csv",
            type=str,
            metavar="PATH",
            help="Also write the order lines of the range as CSV to PATH ('-' for standard "
            "output, instead of the figures).",
        )

    def handle(self, *args: Any, since: date | None, until: date | None, **options: Any) -> None:
        try:
            check_range(since, until)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        path = options["csv"]
        if path == "-":
            for line in iter_order_lines_csv(since=since, until=until):
                self.stdout.write(line, ending="")
            return
        if options["verbosity"] > 0:
            self.print_report(sales_report(since=since, until=until))
        if path:
            lines = self.write_csv(Path(path), since, until)
            if options["verbosity"] > 0:
                self.stdout.write(f"Wrote {lines:,} order lines to {path}")

    def write_csv(self, path: Path, since: date | None, until: date | None) -> int:
        """Write the CSV line by line; return the number of order lines."""
        lines = iter_order_lines_csv(since=since, until=until)
        count = 0
        try:
            with path.open("w", newline="", encoding="utf-8") as out:
                out.write(next(lines))  # the header
                for line in lines:
                    out.write(line)
                    count += 1
        except OSError as error:
            raise CommandError(CANNOT_WRITE.format(path=path, error=error.strerror)) from error
        return count

    def print_report(self, report: SalesReport) -> None:
        write = self.stdout.write
        since = report.since.isoformat() if report.since else "the first order"
        until = report.until.isoformat() if report.until else "the last order"
        write(self.style.MIGRATE_HEADING(f"Sales from {since} to {until}"))
        write("(every order except cancelled ones; revenue is the sum of the order lines)")
        write(f"Orders:              {report.orders:,}")
        write(f"Revenue:             {report.revenue:,.2f}")
        write(f"Average order value: {report.average_order_value:,.2f}")
        write(f"Units:               {report.units:,}")
        if report.products:
            write(self.style.MIGRATE_HEADING("\nPer product, by revenue"))
            sku_width = max(len("sku"), *(len(p.sku) for p in report.products))
            write(f"{'sku':<{sku_width}}  {'units':>10}  {'revenue':>14}  name")
            for p in report.products:
                write(f"{p.sku:<{sku_width}}  {p.units:>10,}  {p.revenue:>14,.2f}  {p.name}")
        if report.days:
            write(self.style.MIGRATE_HEADING("\nPer day"))
            write(f"{'day':<10}  {'orders':>8}  {'revenue':>14}")
            for day in report.days:
                write(f"{day.day.isoformat():<10}  {day.orders:>8,}  {day.revenue:>14,.2f}")
