from django.conf import settings
from django.db import models


class Order(models.Model):
    class Status(models.TextChoices):
        CONFIRMED = "confirmed", "Confirmed"
        SHIPPED = "shipped", "Shipped"
        CANCELLED = "cancelled", "Cancelled"

    # The client's idempotency key: a replayed batch is not applied twice.
    reference = models.CharField(max_length=64, unique=True)
    # Indexed by order_user_created_idx, which leads with it.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="orders", db_index=False
    )
    status = models.CharField(max_length=16, choices=Status, default=Status.CONFIRMED)
    total = models.DecimalField(max_digits=14, decimal_places=2)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # Sales reports and the admin list: orders in a date range.
            models.Index(fields=["created_at"], name="order_created_idx"),
            # A customer's order history, newest first.
            models.Index(fields=["user", "-created_at"], name="order_user_created_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(total__gte=0), name="order_total_non_negative"
            ),
        ]

    def __str__(self) -> str:
        return self.reference


class OrderItem(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="items")
    # Indexed by orderitem_product_order_idx, which leads with it.
    product = models.ForeignKey(
        "products.Product", on_delete=models.PROTECT, related_name="order_items", db_index=False
    )
    quantity = models.PositiveIntegerField()
    unit_price = models.DecimalField(max_digits=12, decimal_places=2)

    class Meta:
        indexes = [
            # Sales report: units and revenue per product.
            models.Index(fields=["product", "order"], name="orderitem_product_order_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(quantity__gt=0), name="orderitem_quantity_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.order_id}: {self.quantity} x {self.product_id}"
