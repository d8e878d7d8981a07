"""``manage.py load_sample_data``: a small sample shop for the demo, from a fixed seed.

Everything but users goes through ``OptimizedBulkOperationsService``. A second
run changes nothing: users are inserted ignoring those that exist; only missing
skus (a replay would put back stock the orders took) and views (by session id)
are sent; scores are upserted with the same values, and orders' fixed references
come back as duplicates.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.core.management.base import BaseCommand, CommandError, CommandParser

from batching.engine import BatchResult
from products.models import Product, ProductView
from products.services import OptimizedBulkOperationsService

SEED = 7
USERNAME = "sample-shopper-{number:03d}"
SKU = "SAMPLE-{number:04d}"
ORDER_REFERENCE = "SAMPLE-ORDER-{number:05d}"
SESSION = "sample-session-{number:05d}"
CATEGORIES = ("Books", "Electronics", "Garden", "Kitchen", "Toys")
ALGORITHMS = ("collaborative", "content_based")
VIEWS_PER_USER = 10
SCORES_PER_USER = 5
ORDERS_PER_USER = 2
AT_LEAST_ONE = "--{option} must be at least 1, not {value}"
Rows = list[dict[str, Any]]


def ensure_users(names: Sequence[str]) -> tuple[list[int], int]:
    """Ids of the named users, in order, creating the missing ones; and how many were new."""
    User = get_user_model()
    before = User.objects.filter(username__in=names).count()
    password = make_password(None)  # sample shoppers cannot log in
    User.objects.bulk_create(
        [User(username=name, email=f"{name}@example.com", password=password) for name in names],
        ignore_conflicts=True,
    )
    ids = dict(User.objects.filter(username__in=names).values_list("username", "pk"))
    return [ids[name] for name in names], len(ids) - before


def product_rows(rng: random.Random, skus: Sequence[str]) -> Rows:
    return [
        {
            "sku": sku,
            "name": f"Sample product {position}",
            "category": CATEGORIES[position % len(CATEGORIES)],
            "price": str(Decimal(rng.randint(199, 19_999)) / 100),
            "stock_quantity": rng.randint(100, 500),
            "is_active": True,
        }
        for position, sku in enumerate(skus, start=1)
    ]


def view_rows(rng: random.Random, users: Sequence[int], products: Sequence[int]) -> Rows:
    kinds = ProductView.InteractionType.values
    return [
        {
            "user_id": rng.choice(users),
            "product_id": rng.choice(products),
            "session_id": SESSION.format(number=number),
            "interaction_type": rng.choices(kinds, weights=(70, 20, 7, 3))[0],
        }
        for number in range(1, len(users) * VIEWS_PER_USER + 1)
    ]


def score_rows(rng: random.Random, users: Sequence[int], products: Sequence[int]) -> Rows:
    picks = min(SCORES_PER_USER, len(products))
    return [
        {
            "user_id": user,
            "product_id": product,
            "algorithm": algorithm,
            "score": round(rng.random(), 4),
        }
        for user in users
        for product in rng.sample(list(products), picks)
        for algorithm in ALGORITHMS
    ]


def order_rows(rng: random.Random, users: Sequence[int], products: Sequence[int]) -> Rows:
    return [
        {
            "reference": ORDER_REFERENCE.format(number=number),
            "user_id": rng.choice(users),
            "items": [
                {"product_id": product, "quantity": rng.randint(1, 2)}
                for product in rng.sample(list(products), rng.randint(1, min(3, len(products))))
            ],
        }
        for number in range(1, len(users) * ORDERS_PER_USER + 1)
    ]


class Command(BaseCommand):
    help = (
        "Load a small sample shop (categories, products, users, views, scores, orders) through "
        "the optimized bulk service. Idempotent: running it again changes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--users", type=int, default=20, help="Sample shoppers to create (default: 20)."
        )
        parser.add_argument(
            "--products", type=int, default=50, help="Sample products to create (default: 50)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        for option in ("users", "products"):
            if options[option] < 1:
                raise CommandError(AT_LEAST_ONE.format(option=option, value=options[option]))
        self.verbosity: int = options["verbosity"]
        service = OptimizedBulkOperationsService()
        # One generator per kind of data, so changing one count leaves the rest alike.
        rng = {kind: random.Random(f"{SEED}:{kind}") for kind in ("p", "v", "s", "o")}

        names = [USERNAME.format(number=n) for n in range(1, options["users"] + 1)]
        user_ids, new_users = ensure_users(names)
        self.say(f"users: {len(user_ids)} sample shoppers ({new_users} new)")

        skus = [SKU.format(number=n) for n in range(1, options["products"] + 1)]
        rows = product_rows(rng["p"], skus)
        present = set(Product.objects.filter(sku__in=skus).values_list("sku", flat=True))
        missing = [row for row in rows if row["sku"] not in present]
        if missing:
            self.report("products", service.import_products(missing))
        else:
            self.say(f"products: all {len(rows)} already present")
        ids = dict(Product.objects.filter(sku__in=skus).values_list("sku", "pk"))
        product_ids = [ids[sku] for sku in skus]

        views = view_rows(rng["v"], user_ids, product_ids)
        sessions = ProductView.objects.filter(session_id__in=[row["session_id"] for row in views])
        seen = set(sessions.values_list("session_id", flat=True))
        new_views = [row for row in views if row["session_id"] not in seen]
        if new_views:
            self.report("views", service.create_product_views(new_views))
        else:
            self.say(f"views: all {len(views)} already loaded")

        scores = score_rows(rng["s"], user_ids, product_ids)
        self.report("scores", service.upsert_recommendation_scores(scores))
        self.report("orders", service.process_orders(order_rows(rng["o"], user_ids, product_ids)))

    def say(self, message: str) -> None:
        if self.verbosity >= 1:
            self.stdout.write(message)

    def report(self, label: str, result: BatchResult) -> None:
        duplicates = sum(1 for error in result.errors if error.code == "duplicate")
        rejected = result.skipped - duplicates
        parts = [f"{result.created} created", f"{result.updated} updated"]
        if duplicates:
            parts.append(f"{duplicates} already processed")
        if rejected:
            parts.append(f"{rejected} rejected")
        self.say(f"{label}: {', '.join(parts)} (log #{result.log_id}, {result.status})")
        # Only replays are expected to skip; anything else deserves a look.
        for error in result.errors:
            if error.code != "duplicate":
                self.stderr.write(f"{label} row {error.index}: {error.field}: {error.message}")
