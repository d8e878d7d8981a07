"""The portable path's inserts: one statement, its rows as parameters (``executemany``).

Unlike ``bulk_create``, no model instance per row: each column gets only the one
conversion its type needs (``adapter``). With ``unique_fields`` it is an upsert
(``ON CONFLICT ... DO UPDATE``, SQLite 3.24 or later).

Note:
    Like ``bulk_create``, this skips ``Model.save()`` and signals and applies
    no field default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from django.db import connections, models

from batching.postgres import column_name, model_field


def adapter(field: models.Field, connection: Any) -> Callable[[Any], Any] | None:
    """What a value of ``field`` needs before the driver takes it; None: nothing."""
    ops = connection.ops
    if isinstance(field, models.ForeignKey):
        return adapter(field.target_field, connection)  # a key is stored as its target
    if isinstance(field, models.DecimalField):
        return partial(
            ops.adapt_decimalfield_value,
            max_digits=field.max_digits,
            decimal_places=field.decimal_places,
        )
    if isinstance(field, models.DateTimeField):
        return ops.adapt_datetimefield_value
    if isinstance(field, models.DateField):
        return ops.adapt_datefield_value
    if isinstance(field, models.TimeField):
        return ops.adapt_timefield_value
    if isinstance(field, models.JSONField | models.UUIDField | models.DurationField):
        return lambda value: field.get_db_prep_save(value, connection)
    return None  # text, integers, booleans and keys go as they are


def insert_rows(
    model: type[models.Model],
    fields: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    using: str,
    constants: Mapping[str, Any] | None = None,
    unique_fields: Sequence[str] = (),
    update_fields: Sequence[str] = (),
) -> None:
    """Insert ``rows`` (tuples in ``fields`` order) with ``constants`` in every row."""
    if not rows:
        return
    connection = connections[using]
    constants = dict(constants or {})
    names = [*fields, *constants]
    columns = [model_field(model, name) for name in names]
    quote = connection.ops.quote_name
    statement = "INSERT INTO {} ({}) VALUES ({})".format(
        quote(model._meta.db_table),
        ", ".join(quote(column_name(model, name)) for name in names),
        ", ".join(["%s"] * len(columns)),
    )
    if unique_fields:
        updated = [quote(column_name(model, name)) for name in update_fields]
        statement += " ON CONFLICT ({}) DO UPDATE SET {}".format(
            ", ".join(quote(column_name(model, name)) for name in unique_fields),
            ", ".join(f"{column} = excluded.{column}" for column in updated),
        )
    adapters = [adapter(column, connection) for column in columns[: len(fields)]]
    fixed = tuple(
        value if (adapt := adapter(column, connection)) is None else adapt(value)
        for column, value in zip(columns[len(fields) :], constants.values(), strict=True)
    )
    if any(adapters):
        params = [
            (
                *(
                    value if adapt is None or value is None else adapt(value)
                    for adapt, value in zip(adapters, row, strict=True)
                ),
                *fixed,
            )
            for row in rows
        ]
    else:
        params = [(*row, *fixed) for row in rows]
    with connection.cursor() as cursor:
        cursor.executemany(statement, params)
