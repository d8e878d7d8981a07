from django.urls import path

from api.health import health
from api.metrics import metrics
from shop.api import api

urlpatterns = [
    path("api/", api.urls),
    path("metrics", metrics, name="metrics"),
    path("health", health, name="health"),
]
