"""Batch endpoints for the catalogue and its interactions; see ``api.batch`` for the flow."""

from django.http import HttpRequest
from ninja import Router

from api.auth import needs
from api.batch import run_rows
from api.schemas import BATCH_RESPONSES, Background, IdempotencyKey, rows_body
from batching.models import BatchProcessingLog

Operation = BatchProcessingLog.Operation
router = Router(tags=["batches"])


@router.post(
    "/product-views/bulk",
    auth=needs("products.add_productview"),
    response=BATCH_RESPONSES,
    summary="Record product views",
    openapi_extra=rows_body(
        "Rows of {user_id, product_id, session_id, interaction_type?, created_at?}.",
        [{"user_id": 1, "product_id": 1, "session_id": "s1", "interaction_type": "view"}],
    ),
)
def product_views_bulk(
    request: HttpRequest, background: Background = False, idempotency_key: IdempotencyKey = None
):
    return run_rows(
        request, Operation.PRODUCT_VIEWS, background=background, idempotency_key=idempotency_key
    )


@router.post(
    "/recommendation-scores/bulk",
    auth=needs("products.add_recommendationscore", "products.change_recommendationscore"),
    response=BATCH_RESPONSES,
    summary="Create or update recommendation scores",
    openapi_extra=rows_body(
        "Rows of {user_id, product_id, algorithm, score}; score in [0, 1].",
        [{"user_id": 1, "product_id": 1, "algorithm": "collaborative", "score": 0.8}],
    ),
)
def recommendation_scores_bulk(
    request: HttpRequest, background: Background = False, idempotency_key: IdempotencyKey = None
):
    return run_rows(
        request,
        Operation.RECOMMENDATION_SCORES,
        background=background,
        idempotency_key=idempotency_key,
    )


@router.post(
    "/products/import",
    auth=needs("products.add_product", "products.change_product"),
    response=BATCH_RESPONSES,
    summary="Create or update products by sku",
    openapi_extra=rows_body(
        "Rows of {sku, name, category, price, stock_quantity, is_active?}.",
        [
            {
                "sku": "SKU-1",
                "name": "Hammer",
                "category": "Tools",
                "price": "12.50",
                "stock_quantity": 10,
            }
        ],
    ),
)
def products_import(
    request: HttpRequest, background: Background = False, idempotency_key: IdempotencyKey = None
):
    return run_rows(
        request, Operation.PRODUCTS, background=background, idempotency_key=idempotency_key
    )
