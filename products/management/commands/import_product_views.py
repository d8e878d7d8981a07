"""``manage.py import_product_views PATH``: stream product views from a file, as
``import_products`` does products (``ImportCommand``)."""

from __future__ import annotations

from batching.models import BatchProcessingLog
from products.management.commands.import_products import ImportCommand


class Command(ImportCommand):
    help = (
        "Record product views from a CSV or JSON Lines file (columns: user_id, product_id, "
        "session_id, interaction_type, created_at). Bad lines are reported and skipped."
    )
    noun = "product views"
    operation = BatchProcessingLog.Operation.PRODUCT_VIEWS
