"""The product list page: the naive path grows with the page, the optimized one does not.

The query counts are what django-debug-toolbar's SQL panel shows with DEBUG on.
"""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from tests.factories import (
    CategoryFactory,
    ProductFactory,
    RecommendationScoreFactory,
    StaffFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db

URL = "/products/"
SESSION = 2  # the session and its staff user
COUNT = 1  # the paginator's COUNT(*)
PAGE = 1  # the page's rows


@pytest.fixture(autouse=True)
def _empty_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def client(client):
    """A logged-in staff member: the page is staff only."""
    client.force_login(StaffFactory())
    return client


@pytest.fixture
def catalogue():
    categories = CategoryFactory.create_batch(3)
    products = [ProductFactory(category=categories[index % 3]) for index in range(12)]
    for product in products[:4]:
        RecommendationScoreFactory.create_batch(2, product=product)
    ProductFactory(is_active=False)
    return products


def test_the_url_is_named():
    assert reverse("products:list") == URL


@pytest.mark.parametrize("user", [None, UserFactory])
def test_only_staff_see_the_page(django_assert_num_queries, user):
    """The naive path is two queries a row: not for anonymous visitors, nor customers."""
    visitor = Client()
    if user:
        visitor.force_login(user())
    # Nothing of the catalogue is read: no query, or the session's alone.
    with django_assert_num_queries(SESSION if user else 0):
        response = visitor.get(URL, {"path": "naive", "per_page": 200})
    assert response.status_code == 302
    assert (
        response["Location"]
        == f"{reverse('admin:login')}?next={URL}%3Fpath%3Dnaive%26per_page%3D200"
    )


@pytest.mark.parametrize("per_page", [3, 10])
def test_naive_path_runs_two_queries_per_row(
    client, catalogue, django_assert_num_queries, per_page
):
    with django_assert_num_queries(SESSION + COUNT + PAGE + 2 * per_page):
        response = client.get(URL, {"path": "naive", "per_page": per_page})
    assert response.status_code == 200
    assert len(response.context["rows"]) == per_page


@pytest.mark.parametrize("per_page", [3, 10])
def test_optimized_path_is_constant(client, catalogue, django_assert_num_queries, per_page):
    # Cold cache: the cards of the page are loaded in one query.
    with django_assert_num_queries(SESSION + COUNT + PAGE + 1):
        client.get(URL, {"per_page": per_page})
    # Warm cache: the cards cost no query.
    with django_assert_num_queries(SESSION + COUNT + PAGE):
        response = client.get(URL, {"path": "optimized", "per_page": per_page})
    assert len(response.context["rows"]) == per_page


def test_both_paths_show_the_same_rows(client, catalogue):
    naive = client.get(URL, {"path": "naive", "per_page": 20}).context["rows"]
    optimized = client.get(URL, {"path": "optimized", "per_page": 20}).context["rows"]
    assert optimized == naive
    assert len(naive) == 12  # the inactive product is not listed
    assert sorted(row["recommendations"] for row in naive) == [0] * 8 + [2] * 4
    assert {row["category"] for row in naive} == {product.category.name for product in catalogue}


def test_pages_and_bad_parameters_fall_back_to_defaults(client, catalogue):
    response = client.get(URL, {"path": "bogus", "per_page": "x", "page": "99"})
    assert response.status_code == 200
    assert response.context["path"] == "optimized"
    assert response.context["page"].number == 1  # 12 rows fit on the default page
    second = client.get(URL, {"per_page": 5, "page": 2})
    assert [row["sku"] for row in second.context["rows"]] == sorted(p.sku for p in catalogue)[5:10]
