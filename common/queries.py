"""Query expressions any app may use."""

from django.db import models
from django.db.models.functions import Coalesce


def related_count(model: type[models.Model], field: str) -> Coalesce:
    """How many ``model`` rows point at the outer row through ``field``: a correlated
    subquery, run per row shown on an index, where ``annotate(Count(...))`` would join and
    group the whole related table, for the page and again for its paginator's COUNT."""
    rows = model._default_manager.filter(**{field: models.OuterRef("pk")}).order_by()
    counts = rows.values(field).annotate(count=models.Count("pk")).values("count")
    return Coalesce(models.Subquery(counts), 0)
