from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"

    def ready(self) -> None:
        from batching.registry import register
        from orders.operations import NaiveOrders, OptimizedOrders

        register(NaiveOrders, OptimizedOrders)
