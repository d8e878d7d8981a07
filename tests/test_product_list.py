"""The product list page: the naive path grows with the page, the optimized one does not.

The query counts are what django-debug-toolbar's SQL panel shows with DEBUG on.
"""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.urls import reverse

from tests.factories import CategoryFactory, ProductFactory, RecommendationScoreFactory

pytestmark = pytest.mark.django_db

URL = "/products/"
COUNT = 1  # the paginator's COUNT(*)
PAGE = 1  # the page's rows


@pytest.fixture(autouse=True)
def _empty_cache():
    cache.clear()
    yield
    cache.clear()


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


@pytest.mark.parametrize("per_page", [3, 10])
def test_naive_path_runs_two_queries_per_row(
    client, catalogue, django_assert_num_queries, per_page
):
    with django_assert_num_queries(COUNT + PAGE + 2 * per_page):
        response = client.get(URL, {"path": "naive", "per_page": per_page})
    assert response.status_code == 200
    assert len(response.context["rows"]) == per_page


@pytest.mark.parametrize("per_page", [3, 10])
def test_optimized_path_is_constant(client, catalogue, django_assert_num_queries, per_page):
    # Cold cache: the cards of the page are loaded in one query.
    with django_assert_num_queries(COUNT + PAGE + 1):
        client.get(URL, {"per_page": per_page})
    # Warm cache: the cards cost no query.
    with django_assert_num_queries(COUNT + PAGE):
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
