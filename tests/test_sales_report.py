"""Sales report and order-lines export: figures, date ranges, fixed queries, flat memory.

The figures come from aggregate queries: the report is exactly 2 queries and
the export 1, measured at two data sizes. The export is a generator consumed
lazily; its memory is measured with tracemalloc against the size of its output.
"""

import csv
import io
import tracemalloc
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.core.management.base import BaseCommand
from django.db import connection
from django.test import Client
from django.urls import reverse

from orders.management.commands.sales_report import Command
from orders.models import Order, OrderItem
from orders.reports import CSV_HEADER, iter_order_lines_csv, sales_report
from products.models import Product
from tests.factories import ProductFactory, StaffFactory, UserFactory

User = get_user_model()

pytestmark = pytest.mark.django_db

MAY_1 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
REPORT_QUERIES = 2  # orders and revenue per day; units and revenue per product
PAGE_QUERIES = 2  # the session and the user, on every admin page
EXPORT_QUERIES = 1  # the lines, joined to their order, customer and product
SVG = "{http://www.w3.org/2000/svg}"

SALES_REPORT_URL = reverse("admin:orders_order_sales_report")
EXPORT_URL = reverse("admin:orders_order_export_csv")


def make_order(
    created_at: datetime,
    lines: list[tuple[object, int, str]],
    *,
    status: str = Order.Status.CONFIRMED,
    user=None,
    reference: str | None = None,
) -> Order:
    """An order with its lines (product, quantity, unit price) at ``created_at``."""
    items = [(product, quantity, Decimal(price)) for product, quantity, price in lines]
    order = Order.objects.create(
        reference=reference or f"ORD-{Order.objects.count() + 1:06d}",
        user=user or UserFactory(),
        status=status,
        total=sum((q * p for _, q, p in items), Decimal("0.00")),
    )
    # created_at is auto_now_add: set the moment afterwards.
    Order.objects.filter(pk=order.pk).update(created_at=created_at)
    OrderItem.objects.bulk_create(
        OrderItem(order=order, product=product, quantity=quantity, unit_price=price)
        for product, quantity, price in items
    )
    return order


@pytest.fixture
def catalogue():
    return {
        "mug": ProductFactory(sku="MUG", name="Mug"),
        "tea": ProductFactory(sku="TEA", name="Tea"),
        "pot": ProductFactory(sku="POT", name="Pot"),
    }


@pytest.fixture
def sales(catalogue):
    """Three days of orders, one of them cancelled."""
    mug, tea, pot = catalogue["mug"], catalogue["tea"], catalogue["pot"]
    make_order(MAY_1, [(mug, 2, "5.00"), (tea, 1, "3.50")])  # 13.50
    make_order(MAY_1 + timedelta(hours=5), [(mug, 1, "5.00")])  # 5.00
    make_order(MAY_1 + timedelta(days=1), [(pot, 1, "30.00"), (tea, 4, "3.00")])  # 42.00
    make_order(  # cancelled: in no figure
        MAY_1 + timedelta(days=1), [(pot, 10, "30.00")], status=Order.Status.CANCELLED
    )
    make_order(  # shipped orders count
        MAY_1 + timedelta(days=3), [(tea, 2, "3.50")], status=Order.Status.SHIPPED
    )  # 7.00


def grow(count: int) -> None:
    """``count`` more orders of two lines each on May 2."""
    first, second = ProductFactory(), ProductFactory()
    for n in range(count):
        make_order(MAY_1 + timedelta(days=1, minutes=n), [(first, 1, "1.00"), (second, 2, "2.00")])


# -- the report ------------------------------------------------------------------


def test_report_figures(sales):
    report = sales_report()
    assert report.orders == 4
    assert report.revenue == Decimal("67.50")
    assert report.average_order_value == Decimal("16.88")  # 67.50 / 4, rounded half up
    assert report.units == 2 + 1 + 1 + 1 + 4 + 2
    assert [(p.sku, p.name, p.units, p.revenue) for p in report.products] == [
        ("POT", "Pot", 1, Decimal("30.00")),
        ("TEA", "Tea", 7, Decimal("22.50")),
        ("MUG", "Mug", 3, Decimal("15.00")),
    ]
    assert [(d.day, d.orders, d.revenue) for d in report.days] == [
        (date(2024, 5, 1), 2, Decimal("18.50")),
        (date(2024, 5, 2), 1, Decimal("42.00")),
        (date(2024, 5, 4), 1, Decimal("7.00")),
    ]
    # The parts add up to the whole.
    assert sum(p.revenue for p in report.products) == report.revenue
    assert sum(d.revenue for d in report.days) == report.revenue


def test_report_as_dict_is_plain_data(sales):
    data = sales_report(since=date(2024, 5, 2)).as_dict()
    assert data["orders"] == 2
    assert data["products"][0] == {
        "product_id": data["products"][0]["product_id"],
        "sku": "POT",
        "name": "Pot",
        "units": 1,
        "revenue": Decimal("30.00"),
    }
    assert data["days"][0] == {"day": date(2024, 5, 2), "orders": 1, "revenue": Decimal("42.00")}


def test_date_range_includes_both_whole_days(catalogue):
    mug = catalogue["mug"]
    make_order(datetime(2024, 5, 1, 23, 59, 59, tzinfo=UTC), [(mug, 1, "1.00")])
    make_order(datetime(2024, 5, 2, 0, 0, tzinfo=UTC), [(mug, 1, "2.00")])
    make_order(datetime(2024, 5, 2, 23, 59, 59, 999999, tzinfo=UTC), [(mug, 1, "4.00")])
    make_order(datetime(2024, 5, 3, 0, 0, tzinfo=UTC), [(mug, 1, "8.00")])
    assert sales_report(since=date(2024, 5, 2), until=date(2024, 5, 2)).revenue == Decimal("6.00")
    assert sales_report(since=date(2024, 5, 2)).revenue == Decimal("14.00")
    assert sales_report(until=date(2024, 5, 1)).revenue == Decimal("1.00")
    assert sales_report(until=date(2024, 4, 30)).orders == 0


def test_empty_range_gives_zeros():
    report = sales_report(since=date(2030, 1, 1))
    assert (report.orders, report.revenue, report.average_order_value, report.units) == (
        0,
        Decimal("0.00"),
        Decimal("0.00"),
        0,
    )
    assert report.products == [] and report.days == []


def test_reversed_range_is_refused():
    with pytest.raises(ValueError, match=r"since \(2024-05-02\) is after until \(2024-05-01\)"):
        sales_report(since=date(2024, 5, 2), until=date(2024, 5, 1))
    with pytest.raises(ValueError, match="is after"):
        iter_order_lines_csv(since=date(2024, 5, 2), until=date(2024, 5, 1))


def test_the_first_and_last_days_a_date_holds_are_open_ends(sales):
    """The day after date.max is no datetime: the range has no upper bound then."""
    report = sales_report(since=date.min, until=date.max)
    assert (report.orders, report.revenue) == (4, Decimal("67.50"))
    assert len(read_csv("".join(iter_order_lines_csv(since=date.min, until=date.max)))) == 1 + 6
    assert sales_report(since=date.max).orders == 0


def test_report_queries_do_not_depend_on_the_number_of_orders(catalogue, django_assert_num_queries):
    grow(3)
    with django_assert_num_queries(REPORT_QUERIES):
        small = sales_report(since=date(2024, 5, 1))
    grow(30)
    with django_assert_num_queries(REPORT_QUERIES):
        large = sales_report(since=date(2024, 5, 1))
    assert (small.orders, large.orders) == (3, 33)
    assert large.revenue == 33 * Decimal("5.00")


# -- the export ------------------------------------------------------------------


def read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_export_lines(sales):
    rows = read_csv("".join(iter_order_lines_csv(until=date(2024, 5, 2))))
    assert rows[0] == list(CSV_HEADER)
    first = rows[1]
    assert first[0] == "ORD-000001"
    assert first[1] == "2024-05-01T10:00:00+00:00"
    assert first[3:] == ["MUG", "Mug", "2", "5.00", "10.00"]
    # Oldest order first; the cancelled order is left out.
    assert [row[0] for row in rows[1:]] == [
        "ORD-000001",
        "ORD-000001",
        "ORD-000002",
        "ORD-000003",
        "ORD-000003",
    ]
    total = sum(Decimal(row[7]) for row in rows[1:])
    assert total == sales_report(until=date(2024, 5, 2)).revenue


def test_export_neutralises_spreadsheet_formulas(catalogue):
    product = ProductFactory(sku="+SKU", name='=HYPERLINK("http://example.com")')
    make_order(MAY_1, [(product, 1, "1.00")], user=UserFactory(username="@evil"))
    row = read_csv("".join(iter_order_lines_csv()))[1]
    assert row[2:5] == ["'@evil", "'+SKU", '\'=HYPERLINK("http://example.com")']


def test_export_is_one_query_whatever_the_number_of_lines(catalogue, django_assert_num_queries):
    grow(3)
    with django_assert_num_queries(EXPORT_QUERIES):
        assert len(list(iter_order_lines_csv(chunk_size=4))) == 1 + 6
    grow(30)
    with django_assert_num_queries(EXPORT_QUERIES):
        assert len(list(iter_order_lines_csv(chunk_size=4))) == 1 + 66


def bulk_lines(lines: int, per_order: int = 10) -> None:
    """``lines`` order lines in ``lines / per_order`` orders, written in bulk."""
    user = UserFactory()
    products = [ProductFactory() for _ in range(per_order)]
    first = Order.objects.count()
    last = first + lines // per_order
    batch = 5_000
    for start in range(first, last, batch):
        orders = Order.objects.bulk_create(
            Order(reference=f"BULK-{n:08d}", user=user, total=Decimal(per_order))
            for n in range(start, min(start + batch, last))
        )
        OrderItem.objects.bulk_create(
            OrderItem(order=order, product=product, quantity=1, unit_price=Decimal("1.00"))
            for order in orders
            for product in products
        )
    if connection.vendor == "postgresql":
        # The test's transaction checks these rows' foreign keys when it ends,
        # with plans cached while the tables were small (sequential scans):
        # fresh statistics make them index lookups.
        with connection.cursor() as cursor:
            for model in (Order, OrderItem, Product, User):
                cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")


def export_peak(**options) -> tuple[int, int, int]:
    """Consume the export line by line: (lines, bytes written, tracemalloc peak)."""
    lines = size = 0
    tracemalloc.start()
    try:
        for line in iter_order_lines_csv(**options):
            lines += 1
            size += len(line)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return lines, size, peak


def test_export_runs_in_flat_memory(catalogue):
    """20,000 lines: the peak is a fraction of the export, and no higher than for 2,000."""
    bulk_lines(2_000)
    lines, _, small_peak = export_peak(chunk_size=500)
    assert lines == 1 + 2_000
    bulk_lines(18_000)
    lines, size, peak = export_peak(chunk_size=500)
    assert lines == 1 + 20_000
    # Holding the lines would take more than their text: size bytes at least.
    print(f"peak {peak:,} B (2,000 lines: {small_peak:,} B) for an export of {size:,} B")
    assert peak < size / 2, f"peak {peak:,} B for an export of {size:,} B"
    assert peak < small_peak * 1.5 + 64_000, f"peak {peak:,} B against {small_peak:,} B"


@pytest.mark.slow
def test_export_of_a_million_lines_runs_in_flat_memory(catalogue):
    bulk_lines(1_000_000, per_order=20)
    lines, size, peak = export_peak()
    assert lines == 1 + 1_000_000
    print(f"1,000,000 lines: peak {peak:,} B for an export of {size:,} B")
    assert peak < 4_000_000, f"peak {peak:,} B for an export of {size:,} B"


# -- the command -----------------------------------------------------------------


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("sales_report", *args, stdout=out)
    return out.getvalue()


def test_command_prints_the_figures(sales):
    output = run("--since", "2024-05-01", "--until", "2024-05-02")
    assert "Sales from 2024-05-01 to 2024-05-02" in output
    assert "Orders:              3" in output
    assert "Revenue:             60.50" in output
    assert "Average order value: 20.17" in output
    lines = output.splitlines()
    assert any(line.startswith("POT") and "30.00" in line and "Pot" in line for line in lines)
    assert any(line.startswith("2024-05-02") and "42.00" in line for line in lines)


def test_command_writes_csv_to_a_file(sales, tmp_path):
    path = tmp_path / "lines.csv"
    output = run("--since", "2024-05-04", "--csv", str(path))
    assert f"Wrote 1 order lines to {path}" in output
    rows = read_csv(path.read_text(encoding="utf-8"))
    assert rows[0] == list(CSV_HEADER)
    assert rows[1][3:] == ["TEA", "Tea", "2", "3.50", "7.00"]
    assert len(rows) == 2


def test_command_writes_csv_alone_to_stdout(sales):
    output = run("--csv", "-")
    rows = read_csv(output)
    assert rows[0] == list(CSV_HEADER)
    assert len(rows) == 1 + 6  # the lines of the four orders that count
    assert "Revenue" not in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "2024-13-01"], r"'2024-13-01' is not a date \(expected YYYY-MM-DD\)"),
        (["--until", "yesterday"], "'yesterday' is not a date"),
        (
            ["--since", "2024-05-02", "--until", "2024-05-01"],
            r"since \(2024-05-02\) is after until \(2024-05-01\)",
        ),
    ],
)
def test_command_refuses_bad_dates(args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)


def test_command_takes_the_last_day_a_date_holds(sales):
    assert "Orders:              4" in run("--since", "0001-01-01", "--until", "9999-12-31")
    assert len(read_csv(run("--until", "9999-12-31", "--csv", "-"))) == 1 + 6


def test_command_reports_an_unwritable_path(tmp_path):
    with pytest.raises(CommandError, match=r"cannot write .*missing"):
        run("--csv", str(tmp_path / "missing" / "lines.csv"))


def test_command_help_lists_its_options():
    parser = Command().create_parser("manage.py", "sales_report")
    text = parser.format_help()
    assert isinstance(Command(), BaseCommand)
    for option in ("--since", "--until", "--csv", "cancelled"):
        assert option in text


# -- the admin -------------------------------------------------------------------


@pytest.fixture
def staff_client(client: Client) -> Client:
    client.force_login(StaffFactory())
    return client


def test_admin_page_shows_the_figures_and_a_chart(sales, staff_client):
    response = staff_client.get(SALES_REPORT_URL, {"since": "2024-05-01", "until": "2024-05-02"})
    assert response.status_code == 200
    content = response.content.decode()
    assert 'id="sales-report-title"' in content
    assert '<dd id="total-orders">3</dd>' in content
    assert '<dd id="total-revenue">60.50</dd>' in content
    assert '<dd id="average-order-value">20.17</dd>' in content
    assert "<svg" in content and "Revenue per day" in content
    report = response.context["report"]
    assert [p.sku for p in report.products] == ["POT", "TEA", "MUG"]
    # The export link keeps the range.
    assert f"{EXPORT_URL}?since=2024-05-01&amp;until=2024-05-02" in content


def test_admin_chart_shows_days_without_sales_at_zero(sales, staff_client):
    chart = ET.fromstring(staff_client.get(SALES_REPORT_URL).context["chart"])
    points = [c.find(f"{SVG}title").text for c in chart.iter(f"{SVG}circle")]
    assert points == [
        "revenue, 2024-05-01: 18.50",
        "revenue, 2024-05-02: 42",
        "revenue, 2024-05-03: 0",
        "revenue, 2024-05-04: 7",
    ]


def test_admin_page_queries_do_not_depend_on_the_number_of_orders(
    catalogue, staff_client, django_assert_num_queries
):
    grow(3)
    with django_assert_num_queries(PAGE_QUERIES + REPORT_QUERIES):
        assert staff_client.get(SALES_REPORT_URL).status_code == 200
    grow(30)
    with django_assert_num_queries(PAGE_QUERIES + REPORT_QUERIES):
        response = staff_client.get(SALES_REPORT_URL)
    assert response.context["report"].orders == 33


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"since": "2024-02-30"}, "Enter a valid date."),
        ({"until": "soon"}, "Enter a valid date."),
        (
            {"since": "2024-05-02", "until": "2024-05-01"},
            "since (2024-05-02) is after until (2024-05-01)",
        ),
    ],
)
@pytest.mark.parametrize("url", [SALES_REPORT_URL, EXPORT_URL])
def test_admin_bad_dates_are_a_clear_400(staff_client, url, query, message):
    response = staff_client.get(url, query)
    assert response.status_code == 400
    assert message in response.content.decode()
    assert response.context["report"] is None


@pytest.mark.parametrize("url", [SALES_REPORT_URL, EXPORT_URL])
def test_admin_takes_the_last_day_a_date_holds(sales, staff_client, url):
    response = staff_client.get(url, {"since": "0001-01-01", "until": "9999-12-31"})
    assert response.status_code == 200
    if url == EXPORT_URL:
        assert len(read_csv(b"".join(response.streaming_content).decode())) == 1 + 6
    else:
        assert response.context["report"].orders == 4


def test_admin_export_streams_the_lines(sales, staff_client, django_assert_num_queries):
    with django_assert_num_queries(PAGE_QUERIES + EXPORT_QUERIES):
        response = staff_client.get(EXPORT_URL, {"since": "2024-05-02"})
        assert response.status_code == 200
        assert response.streaming
        assert response["Content-Type"] == "text/csv; charset=utf-8"
        assert response["Content-Disposition"] == (
            'attachment; filename="order-lines-2024-05-02-to-end.csv"'
        )
        body = b"".join(response.streaming_content).decode()
    rows = read_csv(body)
    assert rows[0] == list(CSV_HEADER)
    assert [row[0] for row in rows[1:]] == ["ORD-000003", "ORD-000003", "ORD-000005"]


def test_admin_export_streams_lazily(sales, staff_client):
    """The view returns before reading the lines: they are read as the body is sent."""
    response = staff_client.get(EXPORT_URL)
    content = iter(response.streaming_content)
    assert next(content).decode().startswith("order,date,customer")
    assert len(list(content)) == 6


def test_changelist_links_honour_the_date_filter(sales, staff_client):
    changelist = reverse("admin:orders_order_changelist")
    response = staff_client.get(
        changelist,
        {
            "created_at__gte": "2024-05-01 00:00:00+00:00",
            "created_at__lt": "2024-05-03 00:00:00+00:00",
        },
    )
    assert response.status_code == 200
    content = response.content.decode()
    assert f'href="{EXPORT_URL}?since=2024-05-01&amp;until=2024-05-02"' in content
    assert f'href="{SALES_REPORT_URL}?since=2024-05-01&amp;until=2024-05-02"' in content
    # Without a date filter, the links cover every order.
    content = staff_client.get(changelist).content.decode()
    assert f'href="{EXPORT_URL}"' in content and f'href="{SALES_REPORT_URL}"' in content


@pytest.mark.parametrize(
    ("query", "suffix"),
    [
        # Not a moment (or none in UTC): refused as the admin refuses any bad
        # filter value, with a redirect to ?e=1.
        ({"created_at__gte": "2024-02-30"}, None),
        ({"created_at__lt": "soon"}, None),
        ({"created_at__gte": "0001-01-01T00:00:00+05:00"}, None),
        # No day before the first moment: that end is left open.
        ({"created_at__lt": "0001-01-01"}, ""),
        (
            {"created_at__gte": "2024-05-01", "created_at__lt": "9999-12-31 00:00:00+00:00"},
            "?since=2024-05-01&amp;until=9999-12-30",
        ),
    ],
)
def test_changelist_date_filter_edge_values_never_fail(sales, staff_client, query, suffix):
    response = staff_client.get(reverse("admin:orders_order_changelist"), query)
    if suffix is None:
        assert response.status_code == 302
        assert response["Location"].endswith("?e=1")
        return
    assert response.status_code == 200
    content = response.content.decode()
    assert f'href="{SALES_REPORT_URL}{suffix}"' in content
    assert f'href="{EXPORT_URL}{suffix}"' in content


def test_admin_index_links_to_the_reports(staff_client):
    content = staff_client.get(reverse("admin:index")).content.decode()
    assert f'href="{SALES_REPORT_URL}"' in content
    assert f'href="{reverse("admin:batching_batchprocessinglog_dashboard")}"' in content


def test_report_pages_need_the_view_permission(client):
    user = StaffFactory(is_superuser=False)
    client.force_login(user)
    assert client.get(SALES_REPORT_URL).status_code == 403
    assert client.get(EXPORT_URL).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="view_order"))
    client.force_login(user)
    assert client.get(SALES_REPORT_URL).status_code == 200
    assert client.get(EXPORT_URL).status_code == 200
    assert not LogEntry.objects.exists()


def test_report_pages_ask_anonymous_users_to_log_in(client):
    response = client.get(SALES_REPORT_URL)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
