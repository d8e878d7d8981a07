from django.conf import settings
from django.db import models
from django.utils import timezone

from batching.models import run_mark


class Category(models.Model):
    name = models.CharField(max_length=100, unique=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "categories"

    def __str__(self) -> str:
        return self.name


class Product(models.Model):
    sku = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    # Indexed by product_category_active_idx, which leads with it.
    category = models.ForeignKey(
        Category, on_delete=models.PROTECT, related_name="products", db_index=False
    )
    price = models.DecimalField(max_digits=12, decimal_places=2)
    stock_quantity = models.IntegerField(default=0)
    is_active = models.BooleanField(default=True)
    view_count = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # The run (catalogue import, price update) and input row that last wrote the
    # product: how a run recognises a sku it already wrote without keeping every
    # sku in memory. No constraint and no index: each row written would pay for them.
    last_import = run_mark()
    last_import_row = models.PositiveBigIntegerField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["sku"]
        indexes = [
            # Catalogue pages: active products of one category.
            models.Index(fields=["category", "is_active"], name="product_category_active_idx"),
        ]
        constraints = [
            # Stock never goes below zero, whatever the code above does.
            models.CheckConstraint(
                condition=models.Q(stock_quantity__gte=0), name="product_stock_non_negative"
            ),
            models.CheckConstraint(
                condition=models.Q(price__gte=0), name="product_price_non_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.sku} {self.name}"


class ProductView(models.Model):
    class InteractionType(models.TextChoices):
        VIEW = "view", "View"
        CLICK = "click", "Click"
        ADD_TO_CART = "add_to_cart", "Add to cart"
        PURCHASE = "purchase", "Purchase"

    # Both indexed by the composite indexes below, which lead with them.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="product_views",
        db_index=False,
    )
    product = models.ForeignKey(
        Product, on_delete=models.CASCADE, related_name="views", db_index=False
    )
    session_id = models.CharField(max_length=64)
    interaction_type = models.CharField(
        max_length=16, choices=InteractionType, default=InteractionType.VIEW
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            # A user's recent activity (recommendations input), newest first.
            models.Index(fields=["user", "-created_at"], name="view_user_created_idx"),
            # Per-product funnel counts: views, clicks, carts, purchases.
            models.Index(fields=["product", "interaction_type"], name="view_product_type_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id} {self.interaction_type} {self.product_id}"


class RecommendationScore(models.Model):
    # Indexed by the unique key and the rank index, which both lead with it.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="recommendation_scores",
        db_index=False,
    )
    product = models.ForeignKey(
        Product, on_delete=models.CASCADE, related_name="recommendation_scores"
    )
    algorithm = models.CharField(max_length=64)
    score = models.FloatField()
    updated_at = models.DateTimeField(auto_now=True)
    # The run and input row that last wrote the score, as Product.last_import.
    last_run = run_mark()
    last_run_row = models.PositiveBigIntegerField(null=True, blank=True, editable=False)

    class Meta:
        constraints = [
            # The upsert key; its index also serves "scores of a user".
            models.UniqueConstraint(
                fields=["user", "product", "algorithm"], name="score_user_product_algo_uniq"
            ),
            models.CheckConstraint(
                condition=models.Q(score__gte=0) & models.Q(score__lte=1),
                name="score_between_0_and_1",
            ),
        ]
        indexes = [
            # A user's top recommendations for one algorithm.
            models.Index(fields=["user", "algorithm", "-score"], name="score_user_algo_rank_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id}/{self.product_id}/{self.algorithm}={self.score}"
