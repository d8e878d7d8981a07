"""Admin pieces every app's admin shares: read-only records and changelists
filtered by their declared filters only, with values the database takes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from django import forms
from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ChangeList
from django.http import HttpRequest


class ReadOnlyAdminMixin:
    """Staff may view these records, never add, change or delete them.

    For records that only a service writes (run logs, bulk-loaded interaction
    data): the view permission still applies, so a staff user needs
    ``view_<model>`` (or superuser) to see them. Without delete permission the
    changelist also loses the "delete selected" action and its checkboxes.
    """

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def filter_moment(value: str) -> datetime | None:
    """A date filter parameter as the aware moment it names; None if it names none.

    A date or a datetime (naive ones in the current time zone), as the
    admin's date filter takes them, and one the database can be sent in UTC:
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

    Django's changelist applies any lookup of the query string to the queryset
    (``?error_summary__regex=...``), and leaves some values to fail in the
    database while the page renders, a 500: a NUL character (PostgreSQL text
    cannot hold one), a regular expression that does not compile, a date
    hierarchy year or a date filter moment beyond what datetime or UTC hold.
    All are refused here, before any query, as the admin's "?e=1" redirect.
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
        # What is left is no list filter's; only the date hierarchy's own
        # bounds, which it puts there for a year it was given, are let through.
        undeclared = set(remaining)
        if self.date_hierarchy and f"{self.date_hierarchy}__year" in self.filter_params:
            undeclared -= {f"{self.date_hierarchy}__gte", f"{self.date_hierarchy}__lt"}
        if undeclared:
            raise IncorrectLookupParameters(f"not a filter of this list: {sorted(undeclared)}")
        for spec in specs:
            if isinstance(spec, admin.DateFieldListFilter):
                for key in (spec.lookup_kwarg_since, spec.lookup_kwarg_until):
                    # Each parameter's values (a list; the stubs say object).
                    values = cast("list[str]", spec.used_parameters.get(key, []))
                    for value in values:
                        if filter_moment(value) is None:
                            raise IncorrectLookupParameters(f"{key}: {value!r} is not a moment")
        return specs, has_filters, remaining, duplicates, active


class DeclaredFiltersMixin:
    """Every changelist of the shop's admin: see ``DeclaredFiltersChangeList``."""

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return DeclaredFiltersChangeList
