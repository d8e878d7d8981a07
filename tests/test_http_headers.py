"""Response headers: no-store on live data."""

import pytest
from django.test import Client

from tests.factories import StaffFactory

pytestmark = pytest.mark.django_db

NO_STORE = [
    "/api/batch-logs",  # an answer
    "/api/no-such-endpoint",  # Django's 404 under /api/
    "/api/openapi.json",
    "/api/docs",
    "/products/",
]


@pytest.fixture
def staff_client(client: Client) -> Client:
    client.force_login(StaffFactory())
    return client


@pytest.mark.parametrize("url", NO_STORE)
def test_api_answers_and_the_product_list_are_not_stored(staff_client, url):
    response = staff_client.get(url)
    assert "no-store" in response["Cache-Control"]


def test_an_unauthenticated_api_answer_is_not_stored(client):
    response = client.get("/api/batch-logs")
    assert response.status_code == 401
    assert "no-store" in response["Cache-Control"]
