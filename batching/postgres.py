"""PostgreSQL fast paths for bulk writes, chosen by vendor.

Django's ``bulk_create(update_conflicts=True)`` builds one model instance and
one group of placeholders per row and cannot say which rows it inserted. Here a
chunk travels as one array per column, and one statement upserts it:

    INSERT INTO t (a, b) SELECT * FROM unnest(%s::type_a[], %s::type_b[])
    ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b
    RETURNING (xmax = 0)

``xmax = 0`` is true for a row this statement inserted and false for one it
updated, so created and updated are told apart without a prior SELECT.
Identifiers are quoted by ``psycopg.sql``; column types come from the model's
own fields; values always travel as parameters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from django.db import connections, models
from psycopg import sql

LENGTH = re.compile(r"\((\d+)\)$")


def is_postgresql(using: str) -> bool:
    return connections[using].vendor == "postgresql"


def array_type(field: models.Field, connection) -> str:
    """The column's type without its length: ``varchar(64)`` becomes ``varchar``.

    An explicit cast to ``varchar(n)`` silently cuts longer values; without the
    length the value reaches the column whole and a too-long one is refused
    there ("value too long"), as a plain INSERT would be.
    """
    return LENGTH.sub("", field.db_type(connection))


def upsert(
    model: type[models.Model],
    fields: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    unique_fields: Sequence[str],
    update_fields: Sequence[str],
    using: str,
) -> tuple[int, int]:
    """Insert or update ``rows`` (tuples in ``fields`` order); return (created, updated).

    Note:
        Like ``bulk_create``, this skips ``Model.save()`` and signals, and
        ``auto_now`` fields are not filled in: pass their values in ``rows``.
        A key may appear only once in ``rows``.
    """
    if not rows:
        return 0, 0
    connection = connections[using]
    meta = model._meta
    columns = {name: meta.get_field(name) for name in (*fields, *unique_fields, *update_fields)}

    def column(name: str) -> sql.Identifier:
        return sql.Identifier(columns[name].column)

    arrays = [
        sql.SQL("{}::{}[]").format(
            sql.Placeholder(), sql.SQL(array_type(columns[name], connection))
        )
        for name in fields
    ]
    statement = sql.SQL(
        "WITH written AS ("
        "INSERT INTO {table} ({columns}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT ({unique}) DO UPDATE SET {updates} "
        "RETURNING (xmax = 0) AS inserted"
        ") SELECT count(*) FILTER (WHERE inserted), count(*) FROM written"
    ).format(
        table=sql.Identifier(meta.db_table),
        columns=sql.SQL(", ").join(column(name) for name in fields),
        arrays=sql.SQL(", ").join(arrays),
        unique=sql.SQL(", ").join(column(name) for name in unique_fields),
        updates=sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(column(name)) for name in update_fields
        ),
    )
    values = [list(values) for values in zip(*rows, strict=True)]
    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute(statement.as_string(connection.connection), values)
        created, total = cursor.fetchone()
    return created, total - created
