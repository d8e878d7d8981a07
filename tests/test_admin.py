"""The Django admin: read-only run logs, and list/detail pages in a fixed query budget.

A page's budget is proved, not assumed: it is measured with 3 rows, then must be
exactly the same with 30 (an N+1 would add 27 queries), and it is pinned, so any
change to it shows up here with its SQL (run with -v to see it).
"""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib import admin
from django.contrib.admin.widgets import AutocompleteSelect, ForeignKeyRawIdWidget
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from batching.models import BatchProcessingLog
from orders.models import Order
from products.models import Category, Product, ProductView, RecommendationScore
from tests.factories import (
    CategoryFactory,
    OrderFactory,
    OrderItemFactory,
    ProductFactory,
    ProductViewFactory,
    RecommendationScoreFactory,
    StaffFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db

Log = BatchProcessingLog
DAY = datetime(2024, 5, 14, 9, 30, tzinfo=UTC)

# Pinned query counts. Every page pays 2 (the session, the user). A changelist
# adds its COUNT, the unfiltered COUNT for "N results (M total)" (left out where
# show_full_result_count is off) and its page of rows, related rows joined.
LOG_CHANGELIST_QUERIES = 8  # + vendor filter's DISTINCT, date hierarchy MIN/MAX and days
LOG_DETAIL_QUERIES = 3  # the run, whole: row_errors is JSON in the same row
PRODUCT_CHANGELIST_QUERIES = 6  # + the category filter's categories
PRODUCT_CHANGE_QUERIES = 4  # the product; the autocomplete loads only its own category
CATEGORY_CHANGELIST_QUERIES = 5  # product counts are a subquery in the page query
ORDER_CHANGELIST_QUERIES = 5  # item counts are a subquery in the page query
ORDER_CHANGE_QUERIES = 5  # the order, its lines with their products, the raw-id user label
PRODUCT_VIEW_CHANGELIST_QUERIES = 4  # one COUNT only
SCORE_CHANGELIST_QUERIES = 4  # one COUNT only


@pytest.fixture(autouse=True)
def _content_types_cached() -> None:
    """Load the admin's content types into Django's per-process cache first.

    Admin pages read them (history links, log entries) through that cache, so
    whether a page queries them depends on which test ran before; warming the
    cache makes every count independent of test order.
    """
    ContentType.objects.get_for_models(*admin.site._registry)


@pytest.fixture
def staff_client(client: Client) -> Client:
    client.force_login(StaffFactory())
    return client


def make_log(**fields) -> BatchProcessingLog:
    values = {
        "operation": Log.Operation.PRODUCT_VIEWS,
        "variant": Log.Variant.OPTIMIZED,
        "status": Log.Status.COMPLETED,
        "chunk_size": 500,
        "started_at": DAY,
        "database_vendor": connection.vendor,
        "worker": "bench-host:4242",
    }
    values.update(fields)
    return Log.objects.create(**values)


def make_logs(count: int) -> None:
    """Runs of every operation and status, all on DAY."""
    operations, statuses = Log.Operation.values, Log.Status.values
    for n in range(count):
        make_log(
            operation=operations[n % len(operations)],
            status=statuses[n % len(statuses)],
            started_at=DAY + timedelta(minutes=n),
            checkpoint_position=100,
            rows_written=90,
            rows_skipped=10,
            query_count=12,
            duration_seconds=0.5,
            error_summary="10 rows skipped: 10 not_found",
            row_errors=[{"index": 1, "field": "user_id", "message": "gone", "code": "not_found"}],
        )


def row_error(index: int) -> dict:
    return {"index": index, "field": "product_id", "message": f"product {index} does not exist"}


def admin_url(model: type, view: str, *args: object) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def listed_pks(response) -> set[int]:
    return {obj.pk for obj in response.context["cl"].result_list}


def assert_fixed_budget(
    client: Client,
    url: str,
    grow: Callable[[int], object],
    pinned: int,
    django_assert_num_queries,
):
    """Open ``url`` after growing its data to 3 rows, then to 30: same, pinned count.

    Returns the response for 30 rows, for the caller to check they are shown.
    """
    grow(3)
    with django_assert_num_queries(pinned, info=f"{url}: the pinned count changed") as small:
        response = client.get(url)
    assert response.status_code == 200
    grow(27)
    with django_assert_num_queries(len(small), info=f"{url}: the count grows with the rows"):
        response = client.get(url)
    assert response.status_code == 200
    return response


# -- query budgets ------------------------------------------------------------


def test_log_changelist_budget(staff_client, django_assert_num_queries):
    response = assert_fixed_budget(
        staff_client,
        admin_url(Log, "changelist"),
        make_logs,
        LOG_CHANGELIST_QUERIES,
        django_assert_num_queries,
    )
    assert response.context["cl"].result_count == 30
    assert len(response.context["cl"].result_list) == 30


def test_log_detail_budget(staff_client, django_assert_num_queries):
    log = make_log(status=Log.Status.PARTIAL)

    def grow(count: int) -> None:
        start = len(log.row_errors)
        log.row_errors += [row_error(start + n) for n in range(count)]
        log.rows_skipped = len(log.row_errors)
        log.save()

    response = assert_fixed_budget(
        staff_client,
        admin_url(Log, "change", log.pk),
        grow,
        LOG_DETAIL_QUERIES,
        django_assert_num_queries,
    )
    assert response.content.count(b"does not exist</td>") == 30


def test_product_changelist_budget(staff_client, django_assert_num_queries):
    # Each product has its own category: a category read per row would show.
    response = assert_fixed_budget(
        staff_client,
        admin_url(Product, "changelist"),
        lambda count: ProductFactory.create_batch(count),
        PRODUCT_CHANGELIST_QUERIES,
        django_assert_num_queries,
    )
    shown = response.context["cl"].result_list
    assert len(shown) == 30
    assert all(product.category.name.encode() in response.content for product in shown)


def test_product_change_form_does_not_load_every_category(staff_client, django_assert_num_queries):
    product = ProductFactory()
    response = assert_fixed_budget(
        staff_client,
        admin_url(Product, "change", product.pk),
        lambda count: CategoryFactory.create_batch(count),
        PRODUCT_CHANGE_QUERIES,
        django_assert_num_queries,
    )
    widget = response.context["adminform"].form.fields["category"].widget.widget
    assert isinstance(widget, AutocompleteSelect)
    assert product.category.name.encode() in response.content


def test_category_changelist_budget(staff_client, django_assert_num_queries):
    def grow(count: int) -> None:
        for category in CategoryFactory.create_batch(count):
            ProductFactory.create_batch(2, category=category)

    response = assert_fixed_budget(
        staff_client,
        admin_url(Category, "changelist"),
        grow,
        CATEGORY_CHANGELIST_QUERIES,
        django_assert_num_queries,
    )
    shown = response.context["cl"].result_list
    assert len(shown) == 30
    assert {category.product_count for category in shown} == {2}


def test_order_changelist_budget(staff_client, django_assert_num_queries):
    def grow(count: int) -> None:
        for order in OrderFactory.create_batch(count):
            OrderItemFactory.create_batch(2, order=order)

    response = assert_fixed_budget(
        staff_client,
        admin_url(Order, "changelist"),
        grow,
        ORDER_CHANGELIST_QUERIES,
        django_assert_num_queries,
    )
    shown = response.context["cl"].result_list
    assert len(shown) == 30
    assert {order.item_count for order in shown} == {2}
    assert all(order.user.username.encode() in response.content for order in shown)


def test_order_change_page_budget_with_items_inline(staff_client, django_assert_num_queries):
    order = OrderFactory()

    def grow(count: int) -> None:
        # More lines (each its own product) and more users: neither may cost.
        OrderItemFactory.create_batch(count, order=order, quantity=3)
        UserFactory.create_batch(count)

    response = assert_fixed_budget(
        staff_client,
        admin_url(Order, "change", order.pk),
        grow,
        ORDER_CHANGE_QUERIES,
        django_assert_num_queries,
    )
    (items,) = response.context["inline_admin_formsets"]
    assert len(items.formset.forms) == 30
    for item in order.items.select_related("product"):
        assert str(item.product).encode() in response.content
    assert response.content.count(b"30.00") == 30  # line totals: 3 x 10.00
    widget = response.context["adminform"].form.fields["user"].widget
    assert isinstance(widget, ForeignKeyRawIdWidget)


def test_product_view_changelist_budget(staff_client, django_assert_num_queries):
    response = assert_fixed_budget(
        staff_client,
        admin_url(ProductView, "changelist"),
        lambda count: ProductViewFactory.create_batch(count),
        PRODUCT_VIEW_CHANGELIST_QUERIES,
        django_assert_num_queries,
    )
    assert len(response.context["cl"].result_list) == 30


def test_score_changelist_budget(staff_client, django_assert_num_queries):
    response = assert_fixed_budget(
        staff_client,
        admin_url(RecommendationScore, "changelist"),
        lambda count: RecommendationScoreFactory.create_batch(count),
        SCORE_CHANGELIST_QUERIES,
        django_assert_num_queries,
    )
    assert len(response.context["cl"].result_list) == 30


# -- the run log: list ----------------------------------------------------------


def test_log_changelist_shows_the_run_columns(staff_client):
    make_log(
        operation=Log.Operation.ORDERS,
        variant=Log.Variant.NAIVE,
        status=Log.Status.PARTIAL,
        checkpoint_position=1234,
        rows_written=1200,
        rows_skipped=34,
        query_count=5678,
        duration_seconds=0.1,
    )
    response = staff_client.get(admin_url(Log, "changelist"))
    content = response.content.decode()
    for text in ("Orders", "Naive (N+1)", "Partial (rows skipped)", "1234", "1200", "34"):
        assert f">{text}<" in content
    assert ">5678<" in content
    assert ">0.100 s<" in content
    assert ">12,340<" in content
    for header in ("rows read", "rows written", "rows skipped", "query count", "rows/s"):
        assert header in content.lower()


def test_log_changelist_does_not_select_the_error_text(staff_client):
    make_logs(3)
    with CaptureQueriesContext(connection) as queries:
        response = staff_client.get(admin_url(Log, "changelist"))
    assert response.status_code == 200
    assert len(response.context["cl"].result_list) == 3
    sql = "\n".join(query["sql"] for query in queries.captured_queries)
    assert "batchprocessinglog" in sql
    assert "row_errors" not in sql
    assert "error_summary" not in sql


@pytest.mark.parametrize(
    ("params", "matching"),
    [
        ({"status__exact": "failed"}, {"status": Log.Status.FAILED}),
        ({"operation__exact": "orders"}, {"operation": Log.Operation.ORDERS}),
        ({"variant__exact": "naive"}, {"variant": Log.Variant.NAIVE}),
        (
            {"started_at__year": "2024", "started_at__month": "6", "started_at__day": "2"},
            {"started_at": datetime(2024, 6, 2, 12, tzinfo=UTC)},
        ),
        ({"q": "deadlock"}, {"error_summary": "TransientFailure: deadlock detected"}),
        ({"q": "worker-7"}, {"worker": "worker-7:99"}),
        ({"q": "recommendation"}, {"operation": Log.Operation.RECOMMENDATION_SCORES}),
    ],
)
def test_log_filters_and_search_exclude_other_runs(staff_client, params, matching):
    other = make_log()
    wanted = make_log(**matching)
    response = staff_client.get(admin_url(Log, "changelist"), params)
    assert response.status_code == 200
    assert listed_pks(response) == {wanted.pk}
    assert other.pk not in listed_pks(response)


def test_log_search_by_id(staff_client):
    # No digits in the text fields, so only the id can match a number.
    wanted, other = make_log(worker=""), make_log(worker="")
    response = staff_client.get(admin_url(Log, "changelist"), {"q": str(wanted.pk)})
    assert listed_pks(response) == {wanted.pk}
    # A word is not compared with the integer id column: no error, text matches.
    response = staff_client.get(admin_url(Log, "changelist"), {"q": "views"})
    assert listed_pks(response) == {wanted.pk, other.pk}


# -- the run log: detail ---------------------------------------------------------


def test_log_detail_shows_counters_checkpoint_timings_and_errors(staff_client):
    log = make_log(
        status=Log.Status.PARTIAL,
        rows_written=497,
        rows_created=400,
        rows_updated=97,
        rows_skipped=3,
        chunks_committed=5,
        chunks_rolled_back=2,
        chunks_retried=1,
        chunks_rerun=4,
        query_count=31,
        checkpoint_position=500,
        resume_count=1,
        worker="bench-host:4242",
        finished_at=DAY + timedelta(seconds=2),
        duration_seconds=2.0,
        error_summary="3 rows skipped: 2 not_found, 1 invalid",
        row_errors=[
            {"index": 7, "field": "user_id", "message": "user 99 does not exist", "code": "nf"},
            {"index": 8, "field": "sku", "message": "<script>alert(1)</script>", "code": "bad"},
            {"index": 9, "field": "price", "message": "must not be negative", "code": "neg"},
        ],
    )
    response = staff_client.get(admin_url(Log, "change", log.pk))
    assert response.status_code == 200
    content = response.content.decode()
    for value in ("497", "400", "97", "31", "bench-host:4242", "2.000 s", "250"):
        assert f">{value}<" in content
    for label in ("Checkpoint position", "Resume count", "Chunks rolled back", "Chunks rerun"):
        assert label in content
    assert "3 rows skipped: 2 not_found, 1 invalid" in content
    assert '<table class="row-errors">' in content
    assert '<th scope="col">Row index</th>' in content
    assert "<tr><td>7</td><td>user_id</td><td>nf</td><td>user 99 does not exist</td></tr>" in (
        content
    )
    # Untrusted text is escaped, never marked safe.
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in content
    assert "<script>alert(1)</script>" not in content
    assert "Showing the first" not in content


def test_log_detail_says_when_the_errors_were_capped(staff_client):
    log = make_log(rows_skipped=250, row_errors=[row_error(n) for n in range(100)])
    response = staff_client.get(admin_url(Log, "change", log.pk))
    assert "Showing the first 100 of 250 skipped rows" in response.content.decode()


def test_log_detail_without_errors_and_with_odd_entries(staff_client):
    clean = make_log(row_errors=[])
    response = staff_client.get(admin_url(Log, "change", clean.pk))
    assert "No row errors." in response.content.decode()
    assert '<table class="row-errors">' not in response.content.decode()

    odd = make_log(row_errors=["<b>free text</b>", {"index": 3}])
    content = staff_client.get(admin_url(Log, "change", odd.pk)).content.decode()
    assert "<td>&lt;b&gt;free text&lt;/b&gt;</td>" in content
    assert "<tr><td>3</td><td></td><td></td><td></td></tr>" in content


def test_log_detail_of_a_real_run_shows_its_skipped_rows(staff_client, optimized):
    user, product = UserFactory(), ProductFactory()
    result = optimized.create_product_views(
        [
            {"user_id": user.pk, "product_id": product.pk, "session_id": "s1"},
            {"user_id": user.pk, "product_id": 10**9, "session_id": "s2"},
            {"user_id": user.pk, "product_id": product.pk, "session_id": ""},
        ]
    )
    assert result.skipped == 2
    response = staff_client.get(admin_url(Log, "change", result.log_id))
    content = response.content.decode()
    for error in result.errors:
        cells = (error.index, error.field, error.code, error.message)
        assert "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>" in content


# -- the run log: read-only ----------------------------------------------------


def test_log_admin_permissions_are_view_only():
    model_admin = admin.site.get_model_admin(Log)
    request = RequestFactory().get("/admin/")
    request.user = StaffFactory()
    log = make_log()
    assert model_admin.has_view_permission(request, log)
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request, log)
    assert not model_admin.has_delete_permission(request, log)
    assert model_admin.get_actions(request) == {}


def test_log_add_is_refused(staff_client):
    assert staff_client.get(admin_url(Log, "add")).status_code == 403
    response = staff_client.post(
        admin_url(Log, "add"),
        {"operation": "orders", "variant": "naive", "chunk_size": 1, "database_vendor": "x"},
    )
    assert response.status_code == 403
    assert not Log.objects.exists()
    changelist = staff_client.get(admin_url(Log, "changelist")).content.decode()
    assert admin_url(Log, "add") not in changelist


def test_log_change_is_refused(staff_client):
    log = make_log(status=Log.Status.RUNNING)
    page = staff_client.get(admin_url(Log, "change", log.pk)).content.decode()
    for button in ('name="_save"', 'name="_continue"', 'name="_addanother"'):
        assert button not in page
    assert admin_url(Log, "delete", log.pk) not in page

    response = staff_client.post(
        admin_url(Log, "change", log.pk), {"status": "completed", "chunk_size": 1}
    )
    assert response.status_code == 403
    log.refresh_from_db()
    assert log.status == Log.Status.RUNNING


def test_log_delete_is_refused(staff_client):
    log = make_log()
    assert staff_client.get(admin_url(Log, "delete", log.pk)).status_code == 403
    assert staff_client.post(admin_url(Log, "delete", log.pk), {"post": "yes"}).status_code == 403
    response = staff_client.post(
        admin_url(Log, "changelist"), {"action": "delete_selected", "_selected_action": [log.pk]}
    )
    # Without delete permission there is no action to run: the list re-renders.
    assert response.status_code == 200
    assert response.context["action_form"] is None
    assert Log.objects.filter(pk=log.pk).exists()


def test_log_needs_the_view_permission(client):
    log = make_log()
    staff = UserFactory(is_staff=True)
    client.force_login(staff)
    assert client.get(admin_url(Log, "changelist")).status_code == 403

    staff.user_permissions.add(Permission.objects.get(codename="view_batchprocessinglog"))
    client.force_login(staff)
    assert client.get(admin_url(Log, "changelist")).status_code == 200
    assert client.get(admin_url(Log, "change", log.pk)).status_code == 200


# -- products and orders -------------------------------------------------------


def test_product_search_and_filters(staff_client):
    kettle = ProductFactory(sku="KET-1", name="Steel kettle")
    teapot = ProductFactory(sku="TEA-1", name="Teapot", is_active=False)
    url = admin_url(Product, "changelist")
    assert listed_pks(staff_client.get(url, {"q": "kettle"})) == {kettle.pk}
    assert listed_pks(staff_client.get(url, {"q": "TEA-1"})) == {teapot.pk}
    assert listed_pks(staff_client.get(url, {"is_active__exact": "0"})) == {teapot.pk}
    by_category = staff_client.get(url, {"category__id__exact": kettle.category_id})
    assert listed_pks(by_category) == {kettle.pk}


def test_order_search_and_filters(staff_client):
    alice = OrderFactory(reference="ORD-ALICE", user=UserFactory(username="alice"))
    bob = OrderFactory(user=UserFactory(username="bob"), status=Order.Status.SHIPPED)
    url = admin_url(Order, "changelist")
    assert listed_pks(staff_client.get(url, {"q": "alice"})) == {alice.pk}
    assert listed_pks(staff_client.get(url, {"q": "ORD-ALICE"})) == {alice.pk}
    assert listed_pks(staff_client.get(url, {"status__exact": "shipped"})) == {bob.pk}


def test_order_status_can_be_changed_but_lines_stay(staff_client):
    order = OrderFactory(total=Decimal("20.00"))
    item = OrderItemFactory(order=order, quantity=2)
    response = staff_client.post(
        admin_url(Order, "change", order.pk),
        {
            "user": order.user_id,
            "status": Order.Status.SHIPPED,
            "total": "0.01",
            "items-TOTAL_FORMS": "1",
            "items-INITIAL_FORMS": "1",
            "items-MIN_NUM_FORMS": "0",
            "items-MAX_NUM_FORMS": "1000",
            "items-0-id": item.pk,
            "items-0-order": order.pk,
            "items-0-quantity": "99",
        },
    )
    assert response.status_code == 302
    order.refresh_from_db()
    item.refresh_from_db()
    assert order.status == Order.Status.SHIPPED
    assert order.total == Decimal("20.00")
    assert item.quantity == 2


def test_orders_and_interactions_cannot_be_added_in_the_admin(staff_client):
    for model in (Order, ProductView, RecommendationScore):
        assert staff_client.get(admin_url(model, "add")).status_code == 403
    view = ProductViewFactory()
    assert staff_client.post(admin_url(ProductView, "delete", view.pk)).status_code == 403
    assert ProductView.objects.filter(pk=view.pk).exists()


def test_product_change_page_shows_the_import_that_last_wrote_it(staff_client, optimized):
    CategoryFactory(name="Tools")
    rows = [
        {"sku": "IMP-1", "name": "n", "category": "Tools", "price": "1.00", "stock_quantity": 1}
    ]
    result = optimized.import_products([*rows, {**rows[0], "sku": "IMP-2"}])
    product = Product.objects.get(sku="IMP-2")
    response = staff_client.get(admin_url(Product, "change", product.pk))
    assert response.status_code == 200
    fields = {
        field.field["name"]: field.contents()
        for fieldset in response.context["adminform"]
        for line in fieldset
        for field in line
        if field.is_readonly
    }
    # A link to the run's log page.
    log_url = reverse("admin:batching_batchprocessinglog_change", args=[result.log_id])
    assert fields["last_import"] == f'<a href="{log_url}">{result.log}</a>'
    assert fields["last_import_row"] == "1"
