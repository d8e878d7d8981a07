from django.apps import AppConfig


class BatchingConfig(AppConfig):
    name = "batching"
    verbose_name = "Batch processing"
