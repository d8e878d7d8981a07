"""The one list of bulk operations: (operation name, variant) -> its ``BatchOperation`` class.

The apps owning the operations fill it from ``AppConfig.ready()``; lookups
happen when an operation runs, never at import time.
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

from batching.engine import BatchOperation
from batching.models import BatchProcessingLog

OPTIMIZED = BatchProcessingLog.Variant.OPTIMIZED
UNKNOWN_OPERATION = "unknown operation {name!r} ({variant}); registered: {known}"
REGISTERED_TWICE = "{key} is registered twice: {first} and {second}"

_operations: dict[tuple[str, str], type[BatchOperation]] = {}


def register(*classes: type[BatchOperation]) -> None:
    """Register operation classes under their ``operation`` and ``variant``."""
    for cls in classes:
        key = (str(cls.operation), str(cls.variant))
        first = _operations.setdefault(key, cls)
        if first is not cls:
            raise ImproperlyConfigured(
                REGISTERED_TWICE.format(key=key, first=first.__qualname__, second=cls.__qualname__)
            )


def operation_class(name: str, variant: str = OPTIMIZED) -> type[BatchOperation]:
    """The class that runs operation ``name`` in ``variant``; LookupError if none does."""
    try:
        return _operations[(str(name), str(variant))]
    except KeyError:
        known = ", ".join(operation_names(variant)) or "none"
        raise LookupError(
            UNKNOWN_OPERATION.format(name=name, variant=variant, known=known)
        ) from None


def operation_names(variant: str = OPTIMIZED) -> list[str]:
    """The names of the operations registered in ``variant``, in the log's order."""
    names = {name for name, registered in _operations if registered == variant}
    ordered = [str(choice) for choice in BatchProcessingLog.Operation.values if choice in names]
    return ordered + sorted(names.difference(ordered))
