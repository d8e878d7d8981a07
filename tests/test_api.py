"""The JSON API's endpoints: behaviour, malformed input, limits, idempotency, query counts.

Requests authenticate with an API token: one query (the token joined to its
user). Batch runs are the service's own queries, counted as in
tests/test_services.py (the test transaction turns each chunk's atomic block
into SAVEPOINT/RELEASE).
"""

import json
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils.timezone import now

from api import batch as batch_flow
from api.models import ApiToken, IdempotencyRecord
from batching.models import BatchProcessingLog
from jobs.models import Job
from orders.models import Order
from products.models import Product, ProductView, RecommendationScore
from products.services import rows as r
from products.services.optimized import OptimizedViews
from tests.concurrency_helpers import inject_faults, record_sleeps
from tests.factories import (
    BatchProcessingLogFactory,
    CategoryFactory,
    OrderFactory,
    OrderItemFactory,
    ProductFactory,
    StaffFactory,
)
from tests.test_jobs import run_all
from tests.test_resilience import deadlock
from tests.test_services import (
    SAVEPOINTS,
    order_rows,
    product_rows,
    score_rows,
    view_rows,
)
from tests.test_services import shop as shop_fixture

pytestmark = pytest.mark.django_db
shop = shop_fixture  # three users, four active products, one inactive

TOKEN = 1  # the token and its user, in one query
# Idempotency: the record's INSERT (in a savepoint, to catch a duplicate key)
# before the run, its UPDATE with the answer after.
RESERVE = 1 + SAVEPOINTS
STORE = 1
# The test transaction's RELEASE of a run's last chunk savepoint: it follows the
# checkpoint that records the run's query_count.
LAST_RELEASE = 1


@pytest.fixture
def staff():
    return StaffFactory()


@pytest.fixture
def api(staff):
    """A client that sends a staff user's API token."""
    _, secret = ApiToken.issue(staff, name="tests")
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")


def post(client, path, body, **extra):
    data = body if isinstance(body, str | bytes) else json.dumps(body, default=str)
    return client.post(path, data=data, content_type="application/json", **extra)


def post_views(client, body, **extra):
    return post(client, "/api/product-views/bulk", body, **extra)


# -- the four batch endpoints ----------------------------------------------------


def counted(send) -> tuple:
    """The response and the number of queries its request ran."""
    with CaptureQueriesContext(connection) as queries:
        response = send()
    return response, len(queries)


def one_chunk_of(operation: str, shop, count: int, tag: str) -> list[dict]:
    """``count`` valid rows for ``operation`` (tagged so each call's keys are new)."""
    if operation == "views":
        return view_rows(shop, count)
    if operation == "scores":
        return score_rows(shop, count, algorithm=tag)
    if operation == "products":
        return product_rows(count, prefix=tag)
    return order_rows(shop, count, prefix=tag)


class TestBatchRunsNow:
    @pytest.mark.parametrize(
        ("operation", "path"),
        [
            ("views", "/api/product-views/bulk"),
            ("scores", "/api/recommendation-scores/bulk"),
            ("products", "/api/products/import"),
            ("orders", "/api/orders/batch"),
        ],
    )
    def test_the_api_adds_only_authentication_to_the_service(self, api, shop, operation, path):
        """The service's queries (tests/test_services.py counts them per chunk) plus the token.

        Twice as many rows in the one chunk cost the same: nothing is queried per row.
        """
        Product.objects.update(stock_quantity=1000)
        for name in ("Imported 0", "Imported 1", "Imported 2"):
            CategoryFactory(name=name)  # known categories: both imports cost the same
        costs = []
        for count, tag in ((6, "a"), (12, "b")):
            response, queries = counted(
                lambda: post(api, path, one_chunk_of(operation, shop, count, tag))  # noqa: B023
            )
            assert response.status_code == 200
            body = response.json()
            assert (body["status"], body["written"], body["errors"]) == ("completed", count, [])
            assert queries == TOKEN + body["query_count"] + LAST_RELEASE
            costs.append(queries)
        assert costs[0] == costs[1]

    def test_product_views(self, api, shop):
        response = post_views(api, view_rows(shop, 20))
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "completed"
        assert (body["read"], body["written"], body["skipped"], body["errors"]) == (20, 20, 0, [])
        assert body["log_id"] == BatchProcessingLog.objects.get().pk
        assert body["variant"] == "optimized"
        assert ProductView.objects.count() == 20

    def test_recommendation_scores(self, api, shop):
        response = post(api, "/api/recommendation-scores/bulk", score_rows(shop, 12))
        assert response.status_code == 200
        assert response.json()["created"] == 12
        assert RecommendationScore.objects.count() == 12

    def test_products_import(self, api):
        response = post(api, "/api/products/import", product_rows(30))
        assert response.status_code == 200
        assert response.json()["created"] == 30
        assert Product.objects.filter(sku__startswith="NEW-").count() == 30

    def test_orders(self, api, shop):
        Product.objects.update(stock_quantity=1000)
        response = post(api, "/api/orders/batch", order_rows(shop, 8))
        assert response.status_code == 200
        assert response.json()["written"] == 8
        assert Order.objects.count() == 8

    def test_bad_rows_are_reported_in_the_result_not_refused(self, api, shop):
        """Well-formed objects that fail validation: 200, per row, good rows written."""
        rows = view_rows(shop, 3)
        rows[1]["user_id"] = "seven"
        rows[2]["product_id"] = 999_999
        response = post_views(api, rows)
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "partial"
        assert body["written"] == 1
        assert [(e["index"], e["field"], e["message"], e["code"]) for e in body["errors"]] == [
            (1, "user_id", r.NOT_INTEGER, "invalid"),
            (2, "product_id", r.UNKNOWN_PRODUCT.format(id=999_999), "not_found"),
        ]

    def test_an_empty_list_is_an_empty_run(self, api):
        response = post_views(api, [])
        assert response.status_code == 200
        assert response.json()["read"] == 0


class TestBatchRunsInTheBackground:
    def submit_queries(self) -> int:
        # submit_job: its atomic block (a savepoint here), the job's INSERT, its
        # rows staged (one COPY, or one INSERT per 5,000 rows), the job's total
        # (UPDATE), its partitions (one INSERT); then its partitions for as_dict.
        # Product views have no key: no query looks for repeated keys.
        return TOKEN + SAVEPOINTS + 1 + 1 + 1 + 1 + 1

    def test_on_request(self, api, shop, django_assert_num_queries):
        with django_assert_num_queries(self.submit_queries()):
            response = post_views(api, view_rows(shop, 5), QUERY_STRING="background=1")
        assert response.status_code == 202
        body = response.json()
        job = Job.objects.get()
        assert body["id"] == str(job.pk)
        assert (body["status"], body["rows_done"], body["rows_total"]) == ("queued", 0, 5)
        assert body["status_url"] == f"/api/jobs/{job.pk}"
        assert job.operation == "product_views"
        assert job.created_by is not None and job.created_by.is_staff
        assert not ProductView.objects.exists()  # nothing ran during the request

    def test_above_the_synchronous_limit(self, api, shop, settings):
        settings.API_SYNC_MAX_ROWS = 4
        assert post_views(api, view_rows(shop, 4)).status_code == 200
        response = post_views(api, view_rows(shop, 5))
        assert response.status_code == 202
        assert Job.objects.get().rows_total == 5

    @pytest.mark.parametrize("text", ["nul\\u0000", "lone \\ud800"])
    def test_text_the_database_cannot_store_is_reported_by_the_job_as_by_a_run(
        self, api, shop, text
    ):
        """A background job stages such a row (as JSON text) and reports it at its
        index, with the message the run at once gives."""
        rows = view_rows(shop, 2)
        rows[0]["session_id"] = "ok \U0001f600"
        rows[1]["session_id"] = "PLACEHOLDER"
        body = json.dumps(rows, cls=DjangoJSONEncoder).replace("PLACEHOLDER", text)
        assert post_views(api, body, QUERY_STRING="background=1").status_code == 202
        job = Job.objects.get()
        run_all(job)
        result = job.as_dict()["result"]
        at_once = post_views(api, body).json()["errors"]
        assert result["errors"] == at_once
        assert [(e["index"], e["field"]) for e in at_once] == [(1, "session_id")]
        assert result["created"] == 1

    def test_job_status(self, api, shop, django_assert_num_queries):
        job_id = post_views(api, view_rows(shop, 5), QUERY_STRING="background=1").json()["id"]
        with django_assert_num_queries(TOKEN + 2):  # the job, its partitions with their logs
            response = api.get(f"/api/jobs/{job_id}")
        assert response.status_code == 200
        assert response.json() | {"created_at": None} == {
            "id": job_id,
            "operation": "product_views",
            "status": "queued",
            "rows_done": 0,
            "rows_total": 5,
            "result": None,
            "created_at": None,
            "finished_at": None,
        }

    def test_unknown_job(self, api):
        response = api.get(f"/api/jobs/{uuid.uuid4()}")
        assert response.status_code == 404
        assert response.json()["errors"] == []

    def test_job_id_must_be_a_uuid(self, api):
        response = api.get("/api/jobs/42")
        assert response.status_code == 400
        assert response.json()["errors"][0]["field"] == "path.job_id"


# -- malformed requests and limits -------------------------------------------------


class TestMalformedInput:
    def test_json_syntax_error_names_the_row(self, api):
        response = post_views(api, '[{"user_id": 1},\n {"user_id": 2,}]')
        assert response.status_code == 400
        body = response.json()
        assert body["detail"].startswith("invalid JSON: ")
        assert "line 2" in body["detail"]
        assert [(e["index"], e["field"]) for e in body["errors"]] == [(1, "row")]

    def test_missing_comma_names_the_row_before_it(self, api):
        response = post_views(api, '[{"a": 1}, {"a": 2} {"a": 3}]')
        assert response.status_code == 400
        assert response.json()["errors"][0]["index"] == 1

    def test_rows_that_are_not_objects_are_all_named(self, api):
        response = post_views(api, '[{"user_id": 1}, 5, "x", null]')
        assert response.status_code == 400
        body = response.json()
        assert body["detail"] == "3 rows are not JSON objects"
        assert body["errors"] == [
            {"index": index, "field": "row", "message": r.NOT_AN_OBJECT} for index in (1, 2, 3)
        ]
        assert not BatchProcessingLog.objects.exists()  # refused whole, nothing ran

    @pytest.mark.parametrize("body", ['{"user_id": 1}', "7", '"rows"', ""])
    def test_the_body_must_be_a_list(self, api, body):
        response = post_views(api, body)
        assert response.status_code == 400
        assert response.json()["errors"][0]["index"] is None

    @pytest.mark.parametrize(
        "body",
        ['[{"score": NaN}]', '[{"score": Infinity}]', "[" * 100_000, "[1" + "0" * 5000 + "]"],
    )
    def test_what_python_would_accept_but_json_does_not(self, api, body):
        response = post_views(api, body)
        assert response.status_code == 400
        assert response.json()["errors"][0]["index"] == 0

    def test_not_utf8(self, api):
        response = post_views(api, b'[{"session_id": "\xff"}]')
        assert response.status_code == 400
        assert response.json()["detail"] == "the body is not UTF-8 text"

    def test_bad_query_parameter_is_named(self, api):
        response = post_views(api, [], QUERY_STRING="background=perhaps")
        assert response.status_code == 400
        assert response.json()["errors"][0]["field"] == "query.background"

    def test_bad_content_length(self, api):
        response = post_views(api, "[]", CONTENT_LENGTH="many")
        assert response.status_code == 400


class TestLimits:
    def test_body_too_large_is_refused_before_it_is_read(
        self, api, settings, django_assert_num_queries
    ):
        settings.API_MAX_BODY_BYTES = 50
        with django_assert_num_queries(TOKEN):
            response = post_views(api, [{"session_id": "x" * 60}])
        assert response.status_code == 413
        assert response.json()["detail"] == (
            "the request body is larger than the limit of 50 bytes"
        )

    def test_django_limit_below_the_api_limit_is_still_413(self, api, settings):
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 50
        response = post_views(api, [{"session_id": "x" * 60}])
        assert response.status_code == 413

    def test_too_many_rows(self, api, settings):
        settings.API_MAX_ROWS = 3
        assert post_views(api, [{}] * 3).status_code == 200
        response = post_views(api, [{}] * 4)
        assert response.status_code == 413
        assert response.json()["detail"] == ("4 rows is more than the limit of 3 rows per request")


# -- Idempotency-Key ---------------------------------------------------------------


class TestIdempotency:
    def test_replay_returns_the_first_answer_without_running(
        self,
        api,
        shop,
        django_assert_num_queries,
    ):
        rows = view_rows(shop, 4)
        first, queries = counted(lambda: post_views(api, rows, HTTP_IDEMPOTENCY_KEY="k-1"))
        assert queries == TOKEN + RESERVE + first.json()["query_count"] + LAST_RELEASE + STORE
        # The INSERT fails inside its savepoint (rolled back to and released),
        # then the record is read.
        with django_assert_num_queries(TOKEN + 1 + SAVEPOINTS + 1 + 1):
            replay = post_views(api, rows, HTTP_IDEMPOTENCY_KEY="k-1")
        assert (replay.status_code, replay.content) == (first.status_code, first.content)
        assert first.status_code == 200
        assert ProductView.objects.count() == 4
        assert BatchProcessingLog.objects.count() == 1

    def test_same_key_with_another_body_is_a_conflict(self, api, shop):
        assert post_views(api, view_rows(shop, 2), HTTP_IDEMPOTENCY_KEY="k").status_code == 200
        response = post_views(api, view_rows(shop, 3), HTTP_IDEMPOTENCY_KEY="k")
        assert response.status_code == 409
        assert "different request" in response.json()["detail"]
        assert ProductView.objects.count() == 2

    def test_same_key_on_another_endpoint_is_a_conflict(self, api):
        assert post_views(api, [], HTTP_IDEMPOTENCY_KEY="k").status_code == 200
        response = post(api, "/api/orders/batch", [], HTTP_IDEMPOTENCY_KEY="k")
        assert response.status_code == 409

    def test_background_replay_returns_the_same_job(self, api, shop):
        rows = view_rows(shop, 3)
        first = post_views(api, rows, QUERY_STRING="background=1", HTTP_IDEMPOTENCY_KEY="j")
        replay = post_views(api, rows, QUERY_STRING="background=1", HTTP_IDEMPOTENCY_KEY="j")
        assert first.status_code == replay.status_code == 202
        assert first.content == replay.content
        assert Job.objects.count() == 1

    def test_a_request_still_running_holds_its_key(self, api, shop, monkeypatch):
        """A second request with the key, arriving while the first runs, runs nothing."""
        real_run_now = batch_flow.run_now
        answers = []

        def run_now_and_collide(operation, rows):
            answers.append(post_views(api, rows, HTTP_IDEMPOTENCY_KEY="busy"))
            return real_run_now(operation, rows)

        monkeypatch.setattr(batch_flow, "run_now", run_now_and_collide)
        first = post_views(api, view_rows(shop, 2), HTTP_IDEMPOTENCY_KEY="busy")
        assert first.status_code == 200
        assert answers[0].status_code == 409
        assert "still running" in answers[0].json()["detail"]
        assert ProductView.objects.count() == 2

    def test_a_failed_run_frees_its_key(self, api, monkeypatch):
        def broken(operation, rows):
            raise RuntimeError("boom")

        monkeypatch.setattr(batch_flow, "run_now", broken)
        with pytest.raises(RuntimeError):
            post_views(api, [], HTTP_IDEMPOTENCY_KEY="retry-me")
        assert not IdempotencyRecord.objects.exists()
        monkeypatch.undo()
        assert post_views(api, [], HTTP_IDEMPOTENCY_KEY="retry-me").status_code == 200

    @pytest.mark.parametrize(("age", "status"), [(599, 409), (601, 200)])
    def test_a_key_without_an_answer_for_too_long_is_free_again(
        self, api, staff, shop, settings, age, status
    ):
        """A process that died mid-run left its record unanswered: retries must not 409 forever."""
        settings.IDEMPOTENCY_PENDING_SECONDS = 600
        IdempotencyRecord.objects.create(
            user=staff, key="dead", request_hash="x", created_at=now() - timedelta(seconds=age)
        )
        response, queries = counted(
            lambda: post_views(api, view_rows(shop, 2), HTTP_IDEMPOTENCY_KEY="dead")
        )
        assert response.status_code == status
        if status == 409:  # not abandoned yet: the key stays taken
            assert not ProductView.objects.exists()
            assert not IdempotencyRecord.objects.get().finished
            return
        # The INSERT refused (in its savepoint), the read, the DELETE, then the
        # queries of a first request.
        run = response.json()["query_count"]
        assert queries == TOKEN + (RESERVE + 1) + 1 + 1 + RESERVE + run + LAST_RELEASE + STORE
        assert IdempotencyRecord.objects.get().status_code == 200
        assert ProductView.objects.count() == 2

    def test_purge_deletes_old_records(self, staff, django_assert_num_queries):
        for key, days in (("old", 8), ("week", 6), ("new", 0)):
            IdempotencyRecord.objects.create(
                user=staff, key=key, created_at=now() - timedelta(days=days, seconds=1)
            )
        out = StringIO()
        with django_assert_num_queries(1):
            call_command("purge_idempotency_keys", stdout=out)
        assert out.getvalue() == "Deleted 1 idempotency records older than 7 days.\n"
        call_command("purge_idempotency_keys", "--older-than", "1", verbosity=0)
        assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["new"]
        with pytest.raises(CommandError, match="must be at least 1"):
            call_command("purge_idempotency_keys", "--older-than", "0")

    def test_keys_belong_to_their_user(self, api):
        assert post_views(api, [], HTTP_IDEMPOTENCY_KEY="mine").status_code == 200
        _, other = ApiToken.issue(StaffFactory())
        other_client = Client(HTTP_AUTHORIZATION=f"Bearer {other}")
        response = post_views(other_client, [{}], HTTP_IDEMPOTENCY_KEY="mine")
        assert response.status_code == 200
        assert IdempotencyRecord.objects.count() == 2

    def test_malformed_requests_do_not_take_the_key(self, api):
        assert post_views(api, "[1]", HTTP_IDEMPOTENCY_KEY="k").status_code == 400
        assert post_views(api, "[]", HTTP_IDEMPOTENCY_KEY="k").status_code == 200


# -- batch logs --------------------------------------------------------------------


class TestBatchLogs:
    def test_list_filters_and_pages(self, api, django_assert_num_queries):
        day = datetime(2026, 3, 1, tzinfo=UTC)
        for i in range(7):
            BatchProcessingLogFactory(
                status="partial", started_at=day + timedelta(hours=i), row_errors=[{}] * 50
            )
        BatchProcessingLogFactory(status="partial", started_at=day - timedelta(days=1))
        BatchProcessingLogFactory(status="failed", started_at=day)
        BatchProcessingLogFactory(operation="products", status="partial", started_at=day)
        query = "operation=orders&status=partial&since=2026-03-01T00:00:00Z&page=2&page_size=3"
        with django_assert_num_queries(TOKEN + 2):  # the count, the page
            response = api.get(f"/api/batch-logs?{query}")
        assert response.status_code == 200
        body = response.json()
        assert body["count"] == 7
        starts = [item["started_at"] for item in body["items"]]
        assert starts == ["2026-03-01T03:00:00Z", "2026-03-01T02:00:00Z", "2026-03-01T01:00:00Z"]
        assert "row_errors" not in body["items"][0]

    @pytest.mark.parametrize(
        ("since", "count"),
        [
            ("2026-03-01T00:00:00", 1),
            ("2026-03-01T10:30:00+10:30", 1),
            ("1044-01-10T09:02:10-22:36", 2),
        ],
    )
    def test_since_in_any_offset(self, api, since, count):
        BatchProcessingLogFactory(started_at=datetime(2026, 3, 1, tzinfo=UTC))
        BatchProcessingLogFactory(started_at=datetime(2026, 2, 28, tzinfo=UTC))
        response = api.get("/api/batch-logs", {"since": since})
        assert response.status_code == 200
        assert response.json()["count"] == count

    @pytest.mark.parametrize(
        "query",
        ["since=0001-01-01T00:00:00%2B05:00", "page=0", "page=10000000000", "page_size=201"],
    )
    def test_out_of_range_parameters_are_a_400(self, api, query):
        response = api.get(f"/api/batch-logs?{query}")
        assert response.status_code == 400
        assert response.json()["errors"][0]["field"].startswith("query.")

    def test_unknown_filter_value_is_a_400(self, api):
        response = api.get("/api/batch-logs?status=bogus")
        assert response.status_code == 400
        assert response.json()["errors"][0]["field"] == "query.status"

    def test_one_log_with_its_row_errors(self, api, django_assert_num_queries):
        errors = [{"index": 3, "field": "sku", "message": "must be a string", "code": "invalid"}]
        log = BatchProcessingLogFactory(status="partial", rows_skipped=1, row_errors=errors)
        with django_assert_num_queries(TOKEN + 1):
            response = api.get(f"/api/batch-logs/{log.pk}")
        assert response.status_code == 200
        assert response.json()["row_errors"] == errors
        assert response.json()["status"] == "partial"

    def test_unknown_log(self, api):
        response = api.get("/api/batch-logs/999999")
        assert response.status_code == 404
        assert response.json() == {"detail": "not found", "errors": []}


# -- sales report --------------------------------------------------------------------


class TestSalesReport:
    @pytest.fixture
    def sales(self):
        hammer, saw = ProductFactory(sku="HAMMER"), ProductFactory(sku="SAW")

        for day, product, quantity, price in (
            (date(2026, 2, 1), hammer, 2, "10.00"),
            (date(2026, 2, 1), saw, 1, "25.50"),
            (date(2026, 2, 3), hammer, 1, "10.00"),
        ):
            order = OrderFactory()
            OrderItemFactory(order=order, product=product, quantity=quantity, unit_price=price)
            created = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=9)
            Order.objects.filter(pk=order.pk).update(created_at=created)

    def test_totals_per_product_and_per_day(self, api, sales, django_assert_num_queries):
        with django_assert_num_queries(TOKEN + 2):  # orders per day, lines per product
            response = api.get("/api/reports/sales")
        assert response.status_code == 200
        body = response.json()
        assert (body["orders"], body["revenue"], body["average_order_value"]) == (
            3,
            "55.50",
            "18.50",
        )
        assert [(p["sku"], p["units"], p["revenue"]) for p in body["products"]] == [
            ("HAMMER", 3, "30.00"),
            ("SAW", 1, "25.50"),
        ]
        assert body["days"] == [
            {"day": "2026-02-01", "orders": 2, "revenue": "45.50"},
            {"day": "2026-02-03", "orders": 1, "revenue": "10.00"},
        ]

    def test_date_range(self, api, sales):
        body = api.get("/api/reports/sales?since=2026-02-02&until=2026-02-03").json()
        assert (body["orders"], Decimal(body["revenue"])) == (1, Decimal("10.00"))

    def test_reversed_range_is_a_400(self, api):
        response = api.get("/api/reports/sales?since=2026-02-03&until=2026-02-01")
        assert response.status_code == 400
        assert response.json()["errors"][0]["field"] == "since"
        assert response.json()["detail"] == "since (2026-02-03) is after until (2026-02-01)"

    def test_the_first_and_last_days_a_date_holds_are_open_ends(self, api, sales):
        response = api.get("/api/reports/sales?since=0001-01-01&until=9999-12-31")
        assert response.status_code == 200
        assert response.json()["orders"] == 3

    def test_bad_date_is_a_400(self, api):
        response = api.get("/api/reports/sales?since=yesterday")
        assert response.status_code == 400
        assert response.json()["errors"][0]["field"] == "query.since"


# -- a run that fails: the shop is busy -----------------------------------------------


@pytest.mark.django_db(transaction=True)
class TestARunThatFails:
    """A run whose chunk's retries ran out is an error answer, never a 200 that says "failed".

    Committed for real (``transaction=True``): only outside a caller's
    transaction does the engine retry a chunk.
    """

    @pytest.fixture(autouse=True)
    def _fast_retries(self, settings, monkeypatch):
        settings.BULK_RETRY_ATTEMPTS = 2
        record_sleeps(monkeypatch)

    def test_nothing_written_is_503_with_retry_after_and_frees_the_key(
        self, api, shop, monkeypatch
    ):
        rows = view_rows(shop, 3)
        inject_faults(monkeypatch, OptimizedViews, lambda call: deadlock())
        response = post_views(api, rows, HTTP_IDEMPOTENCY_KEY="busy-1")

        assert response.status_code == 503
        assert response["Retry-After"] == str(batch_flow.RETRY_AFTER_SECONDS)
        log = BatchProcessingLog.objects.get()
        assert response.json() == {
            "detail": batch_flow.NOTHING_WRITTEN.format(log_id=log.pk, error=log.error_summary),
            "errors": [],
        }
        assert "deadlock detected" in response.json()["detail"]
        assert not ProductView.objects.exists()
        assert not IdempotencyRecord.objects.exists()  # the same batch may be sent again

        monkeypatch.undo()
        retry = post_views(api, rows, HTTP_IDEMPOTENCY_KEY="busy-1")
        assert retry.status_code == 200
        assert ProductView.objects.count() == 3

    def test_some_chunks_committed_is_500_kept_under_the_key(
        self, api, shop, monkeypatch, settings
    ):
        settings.BULK_CHUNK_SIZE = 2
        inject_faults(monkeypatch, OptimizedViews, lambda call: deadlock() if call > 1 else None)
        response = post_views(api, view_rows(shop, 5), HTTP_IDEMPOTENCY_KEY="half")

        assert response.status_code == 500
        assert "after committing 2 of its rows" in response.json()["detail"]
        assert ProductView.objects.count() == 2
        replay = post_views(api, view_rows(shop, 5), HTTP_IDEMPOTENCY_KEY="half")
        assert (replay.status_code, replay.json()["detail"]) == (500, response.json()["detail"])
        assert ProductView.objects.count() == 2  # not applied twice
