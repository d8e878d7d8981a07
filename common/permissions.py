"""The admin's permission rule, for pages and endpoints outside the admin."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def missing_permissions(user: Any, permissions: Iterable[str]) -> list[str]:
    """The permissions (``app_label.codename``) ``user`` lacks.

    The admin's rule (``ModelAdmin.has_view_permission``): a change permission grants the view one.
    """

    def granted(permission: str) -> bool:
        app_label, _, codename = permission.partition(".")
        change = f"{app_label}.change_{codename.removeprefix('view_')}"
        return user.has_perm(permission) or (codename.startswith("view_") and user.has_perm(change))

    return [permission for permission in permissions if not granted(permission)]
