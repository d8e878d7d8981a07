"""The JSON API: one NinjaAPI, a router per topic, one error shape, one auth rule."""

from ninja import NinjaAPI, Swagger

from api.auth import UNDECLARED_AUTH
from api.errors import install_error_handlers
from api.routers.batch_logs import router as batch_logs_router
from api.routers.jobs import router as jobs_router
from api.routers.orders import router as orders_router
from api.routers.products import router as products_router

api = NinjaAPI(
    title="Shop bulk operations",
    version="1.0.0",
    description=(
        "Batch writes for the shop (product views, recommendation scores, catalogue "
        "imports, orders), their background jobs, batch run logs and the sales report. "
        "Every endpoint needs an active staff user with the model permissions the admin "
        "asks for the same work: an API token (`Authorization: Bearer ...`) or a session "
        "with its CSRF token."
    ),
    auth=UNDECLARED_AUTH,  # each endpoint declares its own: api.auth.needs
    urls_namespace="api",
    docs=Swagger(settings={"validatorUrl": None}),
)
install_error_handlers(api)

api.add_router("", products_router)
api.add_router("", orders_router)
api.add_router("", jobs_router)
api.add_router("", batch_logs_router)
