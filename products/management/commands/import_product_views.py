"""``manage.py import_product_views PATH``: stream product views from a file.

Same options, output and resume behaviour as ``import_products`` (see
``ImportCommand`` there); each row records one view and adds one to its
product's view_count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from batching.engine import BatchResult
from products.management.commands.import_products import ImportCommand
from products.services.base import BulkOperationsService


class Command(ImportCommand):
    help = (
        "Record product views from a CSV or JSON Lines file (columns: user_id, product_id, "
        "session_id, interaction_type, created_at). Bad lines are reported and skipped."
    )
    noun = "product views"

    def run_service(
        self,
        service: BulkOperationsService,
        rows: Iterable[Mapping[str, Any]],
        *,
        chunk_size: int | None,
        resume: int | None,
    ) -> BatchResult:
        return service.create_product_views(rows, chunk_size=chunk_size, resume=resume)
