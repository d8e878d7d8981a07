"""The API's routers, one per topic; ``api.main`` mounts them all on the one NinjaAPI."""
