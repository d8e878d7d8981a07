"""``manage.py warm_cache``: fill the cache with every product card and recommendation list
(after a deploy, a cache flush or a catalogue import, which retires every card)."""

from __future__ import annotations

from argparse import ArgumentParser
from collections.abc import Callable, Iterator
from typing import Any

from django.core.management.base import BaseCommand

from common.cli import Progress, positive_int
from products import cache
from products.models import Product, RecommendationScore

DEFAULT_CHUNK_SIZE = 1000


class Command(BaseCommand):
    help = (
        "Store every product card and every user's top recommendations in the cache "
        "(Redis when REDIS_URL is set), a chunk at a time."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--chunk-size",
            type=positive_int,
            default=DEFAULT_CHUNK_SIZE,
            metavar="N",
            help=f"Products or users per query and per set_many (default {DEFAULT_CHUNK_SIZE}).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        chunk_size: int = options["chunk_size"]
        verbosity: int = options["verbosity"]
        products = self.run(
            "product cards", cache.warm_products(chunk_size), verbosity, Product.objects.count
        )
        users = self.run(
            "recommendations",
            cache.warm_recommendations(chunk_size),
            verbosity,
            RecommendationScore.objects.values("user_id").distinct().count,
        )
        if verbosity >= 1:
            self.stdout.write(
                f"Cached {products:,} product cards and the recommendations of {users:,} users.",
                self.style.SUCCESS,
            )

    def run(self, noun: str, ids: Iterator[int], verbosity: int, total: Callable[[], int]) -> int:
        """Drain ``ids`` (the warming happens as it is read), with a bar on a terminal."""
        progress = None
        if verbosity >= 1 and self.stdout.isatty():
            progress = Progress(self.stdout, total())
            progress.label = f"{noun}: "
        try:
            return sum(1 for _ in (progress.track(ids) if progress else ids))
        finally:
            if progress is not None:
                progress.finish()
