"""Admin changelists filter by their declared filters only, and odd values never answer 500.

Django applies any lookup of a changelist's query string to its queryset, and
some values fail only in the database: a NUL character (PostgreSQL text cannot
hold one), a regular expression that does not compile, a year or a moment
beyond what datetime or UTC hold. Every list answers them with the admin's own
"invalid filter" redirect (``?e=1``) instead, on SQLite and PostgreSQL alike.
"""

from datetime import UTC, datetime

import pytest
from django.contrib import admin
from django.test import Client, RequestFactory
from django.urls import reverse

from api.models import IdempotencyRecord
from batching.models import BatchProcessingLog
from common.admin import DeclaredFiltersChangeList
from jobs.models import Job
from orders.models import Order
from products.models import ProductView
from tests.factories import (
    BatchProcessingLogFactory,
    OrderFactory,
    ProductViewFactory,
    StaffFactory,
)

pytestmark = pytest.mark.django_db

DAY = datetime(2024, 5, 14, 9, 30, tzinfo=UTC)
PROJECT_APPS = {"batching", "products", "orders", "jobs", "api"}

LISTS = {
    "batch log": BatchProcessingLog,
    "orders": Order,
    "product views": ProductView,
    "jobs": Job,
    "idempotency": IdempotencyRecord,
}

ODD_QUERIES = [
    # The three, on every list.
    "status__exact=%00",
    "started_at__year=99999999999999999999",
    "error_summary__regex=%5C",
    # Their relatives: the same on other fields, a date hierarchy month past
    # year 9999, a date filter moment with no UTC equivalent.
    "operation__exact=%00",
    "interaction_type__exact=%00",
    "created_at__year=99999999999999999999",
    "created_at__year=9999&created_at__month=12",
    "started_at__year=9999&started_at__month=12",
    "created_at__gte=0001-01-01T00:00%2B05:00",
    "id__regex=%5C",
    "key__regex=%5C",
]


@pytest.fixture
def staff_client(client: Client) -> Client:
    staff = StaffFactory()
    client.force_login(staff)
    # A row in every list, so that SQLite's regex (run per row) is reached.
    BatchProcessingLogFactory(started_at=DAY)
    OrderFactory()
    ProductViewFactory()
    Job.objects.create(operation=BatchProcessingLog.Operation.ORDERS, partition_size=10)
    IdempotencyRecord.objects.create(user=staff, key="k-1", request_hash="0" * 64)
    return client


def changelist(model: type) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


@pytest.mark.parametrize("query", ODD_QUERIES)
@pytest.mark.parametrize("model", LISTS.values(), ids=LISTS.keys())
def test_odd_filter_values_are_the_admins_invalid_filter(staff_client, model, query):
    url = changelist(model)
    response = staff_client.get(f"{url}?{query}")
    assert response.status_code == 302, response.content[:500]
    assert response["Location"] == f"{url}?e=1"


@pytest.mark.parametrize(
    ("model", "params"),
    [
        (BatchProcessingLog, {"status__exact": "completed", "started_at__year": "2024"}),
        (Order, {"status__exact": "confirmed", "created_at__gte": "2000-01-01 00:00:00+00:00"}),
        (
            ProductView,
            {"interaction_type__exact": "view", "created_at__lt": "9999-01-01 00:00:00+00:00"},
        ),
        (Job, {"status__exact": "queued", "created_at__year": str(datetime.now(UTC).year)}),
        (IdempotencyRecord, {"created_at__year": str(datetime.now(UTC).year)}),
    ],
    ids=LISTS.keys(),
)
def test_declared_filters_still_filter(staff_client, model, params):
    response = staff_client.get(changelist(model), params)
    assert response.status_code == 200
    assert len(response.context["cl"].result_list) == 1


def test_every_project_admin_uses_the_declared_filters_changelist():
    request = RequestFactory().get("/")
    for model, model_admin in admin.site._registry.items():
        if model._meta.app_label in PROJECT_APPS:
            assert model_admin.get_changelist(request) is DeclaredFiltersChangeList, model
