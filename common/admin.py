"""Admin pieces every app shares: read-only records, changelists filtered by declared filters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from django import forms
from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ChangeList
from django.http import HttpRequest


class ReadOnlyAdminMixin:
    """Staff with ``view_<model>`` may view these records (a service writes them), never edit."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def filter_moment(value: str) -> datetime | None:
    """A date filter parameter as the aware moment it names, if one UTC can hold; else None.

    ``0001-01-01T00:00+05:00`` is a valid datetime with no UTC equivalent.
    """
    try:
        moment = forms.DateTimeField().to_python(value)
        if moment is not None:
            moment.astimezone(UTC)  # OverflowError when there is no such moment in UTC
    except (forms.ValidationError, OverflowError):
        return None
    return moment


class DeclaredFiltersChangeList(ChangeList):
    """A changelist filtered by its admin's declared filters only, with values the database takes.

    Django applies any lookup of the query string (``?error_summary__regex=...``)
    and lets some values fail in the database mid-render (a 500): a NUL, a bad
    regular expression, a date beyond what datetime or UTC hold. All are
    refused here, before any query, as the admin's "?e=1" redirect.
    """

    def get_filters_params(self, params=None):
        lookup_params = super().get_filters_params(params)
        for key, values in lookup_params.items():
            if any("\x00" in value for value in values):
                raise IncorrectLookupParameters(f"{key}: a NUL character")
        return lookup_params

    def get_filters(self, request: HttpRequest):
        try:
            specs, has_filters, remaining, duplicates, active = super().get_filters(request)
        except (ValueError, OverflowError) as exc:  # a date hierarchy day datetime cannot hold
            raise IncorrectLookupParameters(exc) from exc
        # Only the date hierarchy's own bounds (for a year it was given) may be left.
        undeclared = set(remaining)
        if self.date_hierarchy and f"{self.date_hierarchy}__year" in self.filter_params:
            undeclared -= {f"{self.date_hierarchy}__gte", f"{self.date_hierarchy}__lt"}
        if undeclared:
            raise IncorrectLookupParameters(f"not a filter of this list: {sorted(undeclared)}")
        for spec in specs:
            if isinstance(spec, admin.DateFieldListFilter):
                for key in (spec.lookup_kwarg_since, spec.lookup_kwarg_until):
                    for value in cast("list[str]", spec.used_parameters.get(key, [])):
                        if filter_moment(value) is None:
                            raise IncorrectLookupParameters(f"{key}: {value!r} is not a moment")
        return specs, has_filters, remaining, duplicates, active


class DeclaredFiltersMixin:
    """Every changelist of the shop's admin is a ``DeclaredFiltersChangeList``."""

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return DeclaredFiltersChangeList
