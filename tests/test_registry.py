"""The one list of operations (``batching.registry``), filled by the apps in ready()."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from batching.models import BatchProcessingLog
from batching.registry import operation_class, operation_names, register
from orders.operations import NaiveOrders, OptimizedOrders
from products.services import NaiveBulkOperationsService, OptimizedBulkOperationsService
from products.services.optimized import OptimizedViews

Operation = BatchProcessingLog.Operation
Variant = BatchProcessingLog.Variant


@pytest.mark.parametrize("variant", Variant.values)
def test_every_operation_of_the_log_is_registered_in_both_variants(variant):
    assert operation_names(variant) == list(Operation.values)
    for name in Operation.values:
        cls = operation_class(name, variant)
        assert (cls.operation, cls.variant) == (name, variant)


def test_the_orders_app_registers_the_orders_operation():
    assert operation_class(Operation.ORDERS, Variant.NAIVE) is NaiveOrders
    assert operation_class(Operation.ORDERS) is OptimizedOrders


def test_the_services_find_their_operations_by_their_variant():
    assert OptimizedBulkOperationsService.orders_operation is OptimizedOrders
    assert NaiveBulkOperationsService().orders_operation is NaiveOrders
    assert OptimizedBulkOperationsService().views_operation is OptimizedViews


def test_an_unknown_operation_names_the_registered_ones():
    with pytest.raises(LookupError, match=r"unknown operation 'nope' .*registered: product_views"):
        operation_class("nope")


def test_registering_the_same_class_again_is_harmless():
    register(OptimizedOrders)
    assert operation_class(Operation.ORDERS) is OptimizedOrders


def test_another_class_under_a_taken_name_is_refused():
    class Impostor(OptimizedOrders):
        pass

    with pytest.raises(ImproperlyConfigured, match="registered twice"):
        register(Impostor)
    assert operation_class(Operation.ORDERS) is OptimizedOrders
