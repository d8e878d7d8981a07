"""Bulk operations of the shop: ``from products.services import ...``."""

from products.services.naive import NaiveBulkOperationsService
from products.services.optimized import OptimizedBulkOperationsService

__all__ = ["NaiveBulkOperationsService", "OptimizedBulkOperationsService"]
