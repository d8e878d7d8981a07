"""The indexes the database really has: the named ones, and none that another covers."""

import pytest
from django.db import connection

from orders.models import Order, OrderItem
from products.models import Product, ProductView, RecommendationScore

pytestmark = pytest.mark.django_db

MODELS = [Product, ProductView, RecommendationScore, Order, OrderItem]


def indexes(model) -> dict[str, dict]:
    """The table's indexes as the database reports them (unique ones included)."""
    with connection.cursor() as cursor:
        found = connection.introspection.get_constraints(cursor, model._meta.db_table)
    return {name: info for name, info in found.items() if info["index"] or info["unique"]}


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_named_indexes_exist_on_their_columns(model):
    found = indexes(model)
    for index in model._meta.indexes:
        assert index.name in found, index.name
        columns = [model._meta.get_field(name.lstrip("-")).column for name in index.fields]
        assert found[index.name]["columns"] == columns


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_no_plain_index_is_the_leading_part_of_another(model):
    """Such an index only costs writes: the longer one serves its lookups too.

    A foreign key's own index is the usual case, so the keys that lead a
    composite index are declared ``db_index=False``.
    """
    found = indexes(model)
    redundant = [
        (name, other)
        for name, info in found.items()
        if not info["unique"] and not info["primary_key"]
        for other, longer in found.items()
        if other != name
        and len(longer["columns"]) > len(info["columns"])
        and longer["columns"][: len(info["columns"])] == info["columns"]
    ]
    assert redundant == []
