"""factory-boy factories for the shop's models, and import files made in memory."""

import gzip
import io
from datetime import UTC, datetime
from decimal import Decimal

import factory
from django.contrib.auth import get_user_model

from batching.models import BatchProcessingLog
from orders.models import Order, OrderItem
from products.models import Category, Product, ProductView, RecommendationScore


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.com")


class StaffFactory(UserFactory):
    username = factory.Sequence(lambda n: f"staff{n}")
    is_staff = True
    is_superuser = True
    password = factory.django.Password("staff-password")


class CategoryFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Category
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"Category {n}")


class ProductFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Product

    sku = factory.Sequence(lambda n: f"SKU-{n:06d}")
    name = factory.Sequence(lambda n: f"Product {n}")
    category = factory.SubFactory(CategoryFactory)
    price = Decimal("10.00")
    stock_quantity = 100
    is_active = True


class ProductViewFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ProductView

    user = factory.SubFactory(UserFactory)
    product = factory.SubFactory(ProductFactory)
    session_id = factory.Sequence(lambda n: f"session-{n}")


class RecommendationScoreFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = RecommendationScore

    user = factory.SubFactory(UserFactory)
    product = factory.SubFactory(ProductFactory)
    algorithm = "collaborative"
    score = 0.5


class OrderFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Order

    reference = factory.Sequence(lambda n: f"ORD-{n:06d}")
    user = factory.SubFactory(UserFactory)
    total = Decimal("0.00")


class OrderItemFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = OrderItem

    order = factory.SubFactory(OrderFactory)
    product = factory.SubFactory(ProductFactory)
    quantity = 1
    unit_price = Decimal("10.00")


class BatchProcessingLogFactory(factory.django.DjangoModelFactory):
    """A finished optimized orders run; pass the fields a test is about."""

    class Meta:
        model = BatchProcessingLog

    operation = BatchProcessingLog.Operation.ORDERS
    variant = BatchProcessingLog.Variant.OPTIMIZED
    status = BatchProcessingLog.Status.COMPLETED
    chunk_size = 1000
    started_at = datetime(2026, 1, 1, tzinfo=UTC)


def gzip_bomb(zeros: int, *, before: str = "") -> bytes:
    """``before`` then ``zeros`` zero bytes with no line break, gzipped.

    About a thousandth of ``zeros`` in memory and on disk: the zeros are
    compressed a mebibyte at a time, never held whole.
    """
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as file:
        file.write(before.encode())
        block = bytes(1 << 20)
        for _ in range(zeros >> 20):
            file.write(block)
        file.write(bytes(zeros & ((1 << 20) - 1)))
    return out.getvalue()
