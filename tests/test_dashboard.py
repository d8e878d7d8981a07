"""The batch-run dashboard: figures per operation and variant, charts, fixed queries.

The page costs the same queries with 4 runs as with 40 (three aggregate
queries on top of the session and the user), and it loads nothing from
another site: every chart is inline SVG.
"""

import re
import xml.etree.ElementTree as ET
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from batching import dashboard as dashboard_module
from batching.dashboard import build_dashboard
from batching.models import BatchProcessingLog as Log
from tests.factories import StaffFactory

pytestmark = pytest.mark.django_db

URL = reverse("admin:batching_batchprocessinglog_dashboard")
PAGE_QUERIES = 2  # the session and the user
DASHBOARD_QUERIES = 3  # summary per operation and variant, points over time, slowest runs
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def staff_client(client: Client) -> Client:
    client.force_login(StaffFactory())
    return client


def make_run(
    operation: str = Log.Operation.PRODUCT_VIEWS,
    variant: str = Log.Variant.OPTIMIZED,
    *,
    ago: timedelta = timedelta(hours=1),
    status: str = Log.Status.COMPLETED,
    duration: float | None = 1.0,
    rows_read: int = 1000,
    rows_skipped: int = 0,
) -> Log:
    started_at = timezone.now() - ago
    return Log.objects.create(
        operation=operation,
        variant=variant,
        status=status,
        chunk_size=500,
        started_at=started_at,
        finished_at=None if duration is None else started_at + timedelta(seconds=duration),
        duration_seconds=duration,
        checkpoint_position=rows_read,
        rows_written=rows_read - rows_skipped,
        rows_skipped=rows_skipped,
        database_vendor=connection.vendor,
    )


def grow(count: int) -> None:
    """``count`` finished runs, spread over operations, variants and the last days."""
    operations = [Log.Operation.PRODUCT_VIEWS, Log.Operation.ORDERS]
    for n in range(count):
        make_run(
            operations[n % 2],
            Log.Variant.values[n // 2 % 2],
            ago=timedelta(hours=n + 1),
            duration=0.5 + n,
            rows_skipped=n % 3,
        )


def summary(dashboard, operation: str, variant: str):
    return next(s for s in dashboard.summaries if (s.operation, s.variant) == (operation, variant))


def test_summary_per_operation_and_variant():
    views, naive, optimized = Log.Operation.PRODUCT_VIEWS, Log.Variant.NAIVE, Log.Variant.OPTIMIZED
    make_run(views, naive, duration=10.0)
    make_run(views, naive, duration=30.0, status=Log.Status.FAILED)
    make_run(views, optimized, duration=0.5, rows_skipped=50, status=Log.Status.PARTIAL)
    make_run(views, optimized, duration=1.5, rows_skipped=0)
    make_run(views, optimized, duration=None, status=Log.Status.INTERRUPTED)
    make_run(Log.Operation.ORDERS, optimized, duration=2.0)

    dashboard = build_dashboard(days=30)
    assert [(s.operation, s.variant) for s in dashboard.summaries] == [
        (views, naive),
        (views, optimized),
        (Log.Operation.ORDERS, optimized),
    ]
    slow = summary(dashboard, views, naive)
    assert (slow.runs, slow.failed, slow.failure_rate) == (2, 1, 0.5)
    assert slow.mean_duration == pytest.approx(20.0)
    assert slow.mean_rows_per_second == pytest.approx((100 + 1000 / 30) / 2)
    fast = summary(dashboard, views, optimized)
    assert (fast.runs, fast.partial, fast.interrupted, fast.failed) == (3, 1, 1, 0)
    assert fast.rows_read == 3000 and fast.rows_skipped == 50
    assert fast.skip_rate == pytest.approx(50 / 3000)
    assert fast.mean_duration == pytest.approx(1.0)  # the interrupted run has none
    # Slowest first; a run without a duration is not among them.
    assert [run.duration_seconds for run in dashboard.slowest] == [30.0, 10.0, 2.0, 1.5, 0.5]
    assert dashboard.points == 5


def test_period_leaves_out_older_runs():
    make_run(ago=timedelta(days=2), duration=5.0)
    make_run(ago=timedelta(days=40), duration=7.0)
    assert [r.duration_seconds for r in build_dashboard(days=1).slowest] == []
    assert [r.duration_seconds for r in build_dashboard(days=7).slowest] == [5.0]
    assert [r.duration_seconds for r in build_dashboard(days=None).slowest] == [7.0, 5.0]


def test_slowest_runs_are_capped():
    grow(dashboard_module.SLOWEST + 5)
    slowest = build_dashboard(days=30).slowest
    assert len(slowest) == dashboard_module.SLOWEST
    durations = [run.duration_seconds for run in slowest]
    assert durations == sorted(durations, reverse=True)
    assert durations[0] == 0.5 + dashboard_module.SLOWEST + 4


def test_points_over_time_are_capped(monkeypatch):
    monkeypatch.setattr(dashboard_module, "MAX_POINTS", 4)
    grow(6)
    dashboard = build_dashboard(days=30)
    assert (dashboard.points, dashboard.points_capped) == (4, True)
    circles = sum(
        len(list(ET.fromstring(chart).iter(f"{SVG}circle")))
        for charts in dashboard.operation_charts
        for chart in (charts.throughput, charts.duration)
    )
    assert circles == 4 * 2  # each point on the rows/s chart and on the duration chart


def test_page_shows_charts_and_tables(staff_client):
    grow(8)
    make_run(Log.Operation.ORDERS, Log.Variant.NAIVE, status=Log.Status.FAILED, duration=99.0)
    response = staff_client.get(URL)
    assert response.status_code == 200
    content = response.content.decode()
    for anchor in (
        "dashboard-title",
        "dashboard-period",
        "dashboard-summary",
        "dashboard-charts",
        "dashboard-over-time",
        "dashboard-slowest",
        "over-time-product_views",
        "over-time-orders",
    ):
        assert f'id="{anchor}"' in content
    assert content.count('class="chart"') == 2 + 2 * 2  # two summaries, two per operation
    assert "Mean rows per second by operation" in content
    assert "Orders: rows per second" in content
    # The slowest run links to its page.
    slowest = Log.objects.get(duration_seconds=99.0)
    assert reverse("admin:batching_batchprocessinglog_change", args=[slowest.pk]) in content
    summary_row = re.search(r'<tr class="summary-orders-naive">(.*?)</tr>', content, re.S)
    assert "33.3 %" in summary_row.group(1)  # three runs (two from grow), one failed


def test_page_loads_nothing_from_another_site(staff_client):
    grow(4)
    content = staff_client.get(URL).content.decode()
    addresses = re.findall(r'(?:src|href|action)="([^"]*)"', content)
    assert addresses
    assert not [a for a in addresses if a.startswith(("http:", "https:", "//"))]
    assert '<script src="http' not in content and "@import" not in content


def test_page_queries_do_not_depend_on_the_number_of_runs(staff_client, django_assert_num_queries):
    grow(4)
    with django_assert_num_queries(PAGE_QUERIES + DASHBOARD_QUERIES):
        assert staff_client.get(URL).status_code == 200
    grow(40)
    with django_assert_num_queries(PAGE_QUERIES + DASHBOARD_QUERIES):
        response = staff_client.get(URL, {"days": "0"})
    assert response.context["dashboard"].points == 44


def test_page_without_runs_says_so(staff_client):
    response = staff_client.get(URL)
    assert response.status_code == 200
    content = response.content.decode()
    assert "No runs in this period." in content
    assert "No data" in content  # the summary charts


def test_default_period_is_thirty_days(staff_client):
    make_run(ago=timedelta(days=29), duration=3.0)
    make_run(ago=timedelta(days=31), duration=4.0)
    response = staff_client.get(URL)
    assert response.context["dashboard"].days == 30
    assert [r.duration_seconds for r in response.context["dashboard"].slowest] == [3.0]
    every = staff_client.get(URL, {"days": "0"}).context["dashboard"]
    assert [r.duration_seconds for r in every.slowest] == [4.0, 3.0]


@pytest.mark.parametrize(
    ("days", "message"),
    [
        ("soon", "Enter a whole number."),
        ("-1", "Ensure this value is greater than or equal to 0."),
        ("99999", "Ensure this value is less than or equal to 36500."),
    ],
)
def test_bad_period_is_a_clear_400(staff_client, days, message):
    response = staff_client.get(URL, {"days": days})
    assert response.status_code == 400
    assert message in response.content.decode()
    assert response.context["dashboard"] is None


def test_run_labels_are_escaped(staff_client):
    Log.objects.create(
        operation="<script>x</script>",
        variant=Log.Variant.NAIVE,
        chunk_size=1,
        started_at=timezone.now(),
        duration_seconds=1.0,
        checkpoint_position=5,
        database_vendor="x",
    )
    content = staff_client.get(URL).content.decode()
    assert "<script>x</script>" not in content
    assert "&lt;script&gt;x&lt;/script&gt;" in content


def test_changelist_and_index_link_to_the_dashboard(staff_client):
    changelist = staff_client.get(reverse("admin:batching_batchprocessinglog_changelist"))
    assert f'href="{URL}"' in changelist.content.decode()
    index = staff_client.get(reverse("admin:index"))
    assert f'href="{URL}"' in index.content.decode()


def test_dashboard_needs_the_view_permission(client):
    user = StaffFactory(is_superuser=False)
    client.force_login(user)
    assert client.get(URL).status_code == 403
    assert f'href="{URL}"' not in client.get(reverse("admin:index")).content.decode()
    user.user_permissions.add(Permission.objects.get(codename="view_batchprocessinglog"))
    client.force_login(user)
    assert client.get(URL).status_code == 200
    assert f'href="{URL}"' in client.get(reverse("admin:index")).content.decode()
