from django.apps import AppConfig


class ProductsConfig(AppConfig):
    name = "products"

    def ready(self) -> None:
        from batching.registry import register
        from products.services import naive, optimized

        register(
            naive.NaiveViews,
            naive.NaiveScores,
            naive.NaiveProducts,
            naive.NaiveProductUpdates,
            optimized.OptimizedViews,
            optimized.OptimizedScores,
            optimized.OptimizedProducts,
            optimized.OptimizedProductUpdates,
        )
