from django.urls import path

from api.health import health
from api.main import api
from api.metrics import metrics

urlpatterns = [
    path("api/", api.urls),
    path("metrics", metrics, name="metrics"),
    path("health", health, name="health"),
]
