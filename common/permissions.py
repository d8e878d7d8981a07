"""The admin's permission rule, for pages and endpoints outside the admin."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def missing_permissions(user: Any, permissions: Iterable[str]) -> list[str]:
    """The ``app_label.codename`` permissions of ``permissions`` that ``user`` lacks.

    The admin's rule (``ModelAdmin.has_view_permission``): the change
    permission also grants the view permission of its model.
    """
    missing = []
    for permission in permissions:
        granted = user.has_perm(permission)
        app_label, _, codename = permission.partition(".")
        if not granted and codename.startswith("view_"):
            granted = user.has_perm(f"{app_label}.change_{codename.removeprefix('view_')}")
        if not granted:
            missing.append(permission)
    return missing
