"""PostgreSQL fast paths for bulk writes (docs/architecture.md, "PostgreSQL fast paths").

A chunk travels as one array per column or as ``COPY`` data, and one statement
writes it. An upsert tells created from updated by ``xmax = 0`` (an inserted row).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import psycopg
from django.conf import settings
from django.db import IntegrityError, connections, models, transaction
from django.db.backends.utils import debug_transaction
from psycopg import sql

Model = type[models.Model]
Names = tuple[str, ...]
Rows = Sequence[Sequence[Any]]
LENGTH = re.compile(r"\((\d+)\)$")
# An array parameter's placeholder, always cast (``%s::bigint[]``): its text (``array_value``)
# goes untyped, so PostgreSQL parses it while binding and the planner sees a constant array
# (a hash table for ``= ANY``). Typed as text (``%b``), the cast would run per row.
ARRAY = "%s"
MODIFIERS = re.compile(r"\(.*\)$")  # numeric(12, 2) -> numeric, for COPY's binary types
GUARD_FAILED = "{field} would go below zero (or the row is gone) for {missing} of {total} rows"


def is_postgresql(using: str) -> bool:
    return connections[using].vendor == "postgresql"


def fast_paths(using: str) -> bool:
    """Whether writes on ``using`` take the PostgreSQL fast paths (``BULK_PG_FAST_PATHS``)."""
    return is_postgresql(using) and settings.BULK_PG_FAST_PATHS


def begin_chunk(using: str) -> None:
    """The first statement of every chunk transaction on PostgreSQL (docs/architecture.md,
    "Locks late and short"): foreign keys checked as each statement writes, not in
    COMMIT; a ``lock_timeout`` whose ``55P03`` the engine retries."""
    timeout = int(settings.BULK_LOCK_TIMEOUT_MS)
    with connections[using].cursor() as cursor:
        cursor.execute(f"SET CONSTRAINTS ALL IMMEDIATE; SET LOCAL lock_timeout = {timeout:d}")


def analyze_if_empty(tables: Sequence[Model], *, using: str) -> list[str]:
    """ANALYZE each of ``tables`` whose statistics still say it is empty; return their names.

    It blocks no reads or writes and waits at most ``BULK_LOCK_TIMEOUT_MS`` for an autovacuum.
    """
    names = [model._meta.db_table for model in tables]
    with connections[using].cursor() as cursor:
        cursor.execute(
            "SELECT relname FROM pg_class WHERE oid = ANY(%s::regclass[]) AND reltuples <= 0",
            [names],
        )
        empty = [name for (name,) in cursor.fetchall()]
    for name in empty:
        with transaction.atomic(using=using), connections[using].cursor() as cursor:
            cursor.execute(
                sql.SQL("SET LOCAL lock_timeout = {}; ANALYZE {}")
                .format(sql.Literal(int(settings.BULK_LOCK_TIMEOUT_MS)), sql.Identifier(name))
                .as_string(connections[using].connection)
            )
    return empty


def array_type(field: models.Field, connection) -> str:
    """The column's type without its length (``varchar(64)``: ``varchar``): a cast to
    ``varchar(n)`` would silently cut a longer value that the column refuses."""
    if (type_ := field.db_type(connection)) is None:
        raise ValueError(f"{field} has no column type")
    return LENGTH.sub("", type_)


def model_field(model: Model, name: str) -> models.Field:
    """``model``'s field ``name``; a reverse relation is refused (it has no column)."""
    field = model._meta.get_field(name)
    if not isinstance(field, models.Field):
        raise ValueError(f"{model._meta.label}.{name} is a reverse relation, not a column")
    return field


def column_name(model: Model, name: str) -> str:
    field = model_field(model, name)
    if field.column is None:
        raise ValueError(f"{model._meta.label}.{name} has no column")
    return field.column


def column(model: Model, name: str) -> sql.Identifier:
    return sql.Identifier(column_name(model, name))


def statement_text(compose: Callable[..., str]) -> Callable[..., str]:
    """Cache the SQL text ``compose(connection, *shape)`` makes, per database alias and shape
    (models, field names, options: hashable, positional; never the rows)."""

    @functools.cache
    def text(using: str, *shape: Any) -> str:
        return compose(connections[using], *shape)

    return text


def quoted(connection, model: Model, *names: str) -> str:
    """The model's table (no ``names``) or the columns of its fields ``names``, quoted, joined."""
    quote = connection.ops.quote_name
    if not names:
        return quote(model._meta.db_table)
    return ", ".join(quote(column_name(model, name)) for name in names)


def each(connection, model: Model, names: Iterable[str]) -> list[str]:
    """The quoted columns of the model's fields ``names``, one by one."""
    return [quoted(connection, model, name) for name in names]


def unnest(connection, *columns: tuple[Model, str]) -> str:
    """``unnest(%s::type[], ...)``: one array per (model, field), typed like its column."""
    types = (array_type(model_field(model, name), connection) for model, name in columns)
    return "unnest({})".format(", ".join(f"{ARRAY}::{type_}[]" for type_ in types))


def insert_from_arrays(connection, model: Model, fields: Names, constants: Names) -> str:
    """``INSERT INTO t (fields, constants) SELECT v.fields, %s... FROM unnest(...) AS v``:
    one parameter per constant, then one array per field."""
    table, columns = quoted(connection, model), quoted(connection, model, *fields, *constants)
    names = each(connection, model, fields)
    values = ", ".join([*(f"v.{name}" for name in names), *("%s" for _ in constants)])
    source = unnest(connection, *((model, name) for name in fields))
    return (
        f"INSERT INTO {table} ({columns}) SELECT {values} FROM {source} AS v ({', '.join(names)})"
    )


def columns_of(rows: Rows, width: int) -> list[str | list[Any]]:
    """Rows (tuples) as one array parameter per column (``array_value``): what ``unnest`` takes."""
    if not rows:
        return [array_value(())] * width
    return [array_value(values) for values in zip(*rows, strict=True)]


def _quoted(text: str) -> str:
    if "\\" in text or '"' in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


# The text of an array element, by its type: what PostgreSQL's array input reads back.
ELEMENT_TEXT: dict[type, Callable[[Any], str]] = {
    str: _quoted,
    int: str,
    bool: ("f", "t").__getitem__,
    Decimal: str,
    float: repr,
    type(None): lambda _: "NULL",
}


def array_value(values: Iterable[Any]) -> str | list[Any]:
    """``values`` as an array parameter: the array's text, ``{"a","b\\"c",NULL}``, joined
    in Python (cheaper than psycopg's dump per element; the cast, ``ARRAY``, types it).
    A list with an element of another type (a datetime) is left to psycopg."""
    values = values if isinstance(values, Sequence) else list(values)
    kinds = set(map(type, values))
    if len(kinds) == 1 and (kind := kinds.pop()) in ELEMENT_TEXT:
        # One type: its text function mapped over the column, no lookup per element.
        if kind is str:
            text = '","'.join(values)
            if "\\" not in text and '"' not in text:
                return '{"' + text + '"}'  # nothing to escape: one join
        return "{" + ",".join(map(ELEMENT_TEXT[kind], values)) + "}"
    try:
        return "{" + ",".join([ELEMENT_TEXT[type(value)](value) for value in values]) + "}"
    except KeyError:
        return list(values)


def execute(using: str, statement: sql.Composable | str, params: Sequence[Any] | None = None):
    """Run ``statement``; return (rowcount, its first row or None)."""

    def run(cursor, text):
        cursor.execute(text, params)
        return cursor.rowcount, cursor.fetchone() if cursor.description else None

    return through_django(using, statement, run)


def copy_rows(
    model: Model, fields: Sequence[str], rows: Iterable[Sequence[Any]], *, using: str
) -> int:
    """Binary ``COPY`` of ``rows`` (tuples in ``fields`` order) into the table; the count.

    Note:
        Like ``bulk_create``, this skips ``Model.save()`` and signals and
        applies no field default.
    """
    fields = tuple(fields)
    return _copy_in(using, model, fields, rows, _copy_types(using, model, fields))


def copy_text(model: Model, fields: Sequence[str], blocks: Iterable[str], *, using: str) -> int:
    """``COPY`` text-format ``blocks`` (whole lines, ``copy_escape``d) into the table; the rows."""
    return _copy_in(using, model, tuple(fields), blocks, None)


def _copy_in(using: str, model: Model, fields: Names, data: Iterable, types: Names | None) -> int:
    """COPY ``data``: rows in binary format with ``types``, or text blocks (no ``types``)."""

    def run(cursor, text):
        with cursor.copy(text) as copy:
            if types is None:
                for block in data:
                    copy.write(block)
            else:
                copy.set_types(types)
                for row in data:
                    copy.write_row(row)
        return cursor.rowcount

    return through_django(using, _copy(using, model, fields, types is not None), run)


@statement_text
def _copy(connection, model: Model, fields: Names, binary: bool) -> str:
    table, columns = quoted(connection, model), quoted(connection, model, *fields)
    return f"COPY {table} ({columns}) FROM STDIN" + (" (FORMAT BINARY)" if binary else "")


@functools.cache
def _copy_types(using: str, model: Model, fields: Names) -> Names:
    """The columns' types as COPY's binary format names them (no modifiers)."""
    types = (array_type(model_field(model, name), connections[using]) for name in fields)
    return tuple(MODIFIERS.sub("", type_) for type_ in types)


COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_escape(value: str) -> str:
    """``value`` as COPY's text format writes it (backslash, tab, line breaks escaped)."""
    return value.translate(COPY_ESCAPES)


def through_django(
    using: str, statement: sql.Composable | str, run: Callable[[Any, str], Any]
) -> Any:
    """Call ``run(cursor, sql_text)`` as Django runs a statement: through the execute
    wrappers and query log, errors as Django's; but with a cursor that binds parameters
    on the server (Django's would quote each array element into the SQL text)."""
    connection = connections[using]
    connection.ensure_connection()
    connection.validate_no_broken_transaction()
    text = statement if isinstance(statement, str) else statement.as_string(connection.connection)

    def executor(sql_text, params, many, context):
        with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
            return run(cursor, sql_text)

    for wrapper in reversed(connection.execute_wrappers):
        executor = functools.partial(wrapper, executor)
    with connection.cursor() as cursor, debug_transaction(connection, text):
        return executor(text, None, False, {"connection": connection, "cursor": cursor})


def upsert(
    model: Model,
    fields: Sequence[str],
    rows: Rows,
    *,
    unique_fields: Sequence[str],
    update_fields: Sequence[str],
    using: str,
    constants: Mapping[str, Any] | None = None,
    only_if_distinct: Sequence[str] = (),
) -> tuple[int, int]:
    """Insert or update ``rows`` (tuples in ``fields`` order); return (created, updated).

    ``constants`` gives every row the same value; with ``only_if_distinct`` an existing
    row is updated (and counted) only if one of these columns differs.

    Note:
        Like ``bulk_create``, this skips ``Model.save()`` and signals and fills
        no ``auto_now`` field. A key may appear only once in ``rows``.
    """
    if not rows:
        return 0, 0
    constants = dict(constants or {})
    shape = map(tuple, (fields, unique_fields, update_fields, constants, only_if_distinct))
    statement = _upsert(using, model, *shape)
    # The constants' placeholders come first: SELECT's list precedes FROM.
    params = [*constants.values(), *columns_of(rows, len(fields))]
    _, (created, total) = execute(using, statement, params)
    return created, total - created


@statement_text
def _upsert(connection, model: Model, fields: Names, *shape: Names) -> str:
    unique, update, constants, only = shape
    table = quoted(connection, model)
    updates = ", ".join(f"{name} = EXCLUDED.{name}" for name in each(connection, model, update))
    distinct = (
        f"{table}.{name} IS DISTINCT FROM EXCLUDED.{name}" for name in each(connection, model, only)
    )
    where = " WHERE " + " OR ".join(distinct) if only else ""
    return (
        f"WITH written AS ({insert_from_arrays(connection, model, fields, constants)} "
        f"ON CONFLICT ({quoted(connection, model, *unique)}) "
        f"DO UPDATE SET {updates}{where} RETURNING (xmax = 0) AS inserted"
        ") SELECT count(*) FILTER (WHERE inserted), count(*) FROM written"
    )


def insert_with_children(
    parent: Model,
    fields: Sequence[str],
    rows: Rows,
    *,
    key: str,
    child: Model,
    link: str,
    child_fields: Sequence[str],
    child_rows: Rows,
    using: str,
    constants: Mapping[str, Any] | None = None,
) -> int:
    """Insert parent rows and their children in one statement; return the children's count.

    ``rows`` are tuples in ``fields`` order with the unique ``key``; ``child_rows``,
    ``(key, *child_fields)``, get their parent's new primary key in ``link``.

    Note:
        Like ``bulk_create``, this skips ``Model.save()`` and signals and
        applies no field default.
    """
    if not rows:
        return 0
    constants = dict(constants or {})
    statement = _insert_with_children(
        using, parent, tuple(fields), key, child, link, tuple(child_fields), tuple(constants)
    )
    # The constants' placeholders come first: the parents' SELECT list precedes FROM.
    arrays = [*columns_of(rows, len(fields)), *columns_of(child_rows, 1 + len(child_fields))]
    count, _ = execute(using, statement, [*constants.values(), *arrays])
    return count


@statement_text
def _insert_with_children(
    connection, parent: Model, fields: Names, key: str, child: Model, link: str, *shape: Names
) -> str:
    child_fields, constants = shape
    pk = quoted(connection, parent, parent._meta.pk.name)
    key_column = quoted(connection, parent, key)
    columns = each(connection, child, child_fields)
    source = unnest(connection, (parent, key), *((child, name) for name in child_fields))
    return (
        f"WITH parent AS ({insert_from_arrays(connection, parent, fields, constants)} "
        f"RETURNING {pk}, {key_column}) "
        f"INSERT INTO {quoted(connection, child)} "
        f"({quoted(connection, child, link)}, {', '.join(columns)}) "
        f"SELECT parent.{pk}, {', '.join(f'c.{name}' for name in columns)} "
        f"FROM {source} AS c ({key_column}, {', '.join(columns)}) "
        f"JOIN parent ON parent.{key_column} = c.{key_column}"
    )


def update(
    model: Model,
    key: str,
    fields: Sequence[str],
    rows: Rows,
    *,
    using: str,
    constants: Mapping[str, Any] | None = None,
    only_if_distinct: Sequence[str] = (),
) -> set[Any]:
    """Lock and update existing rows found by a unique ``key``; return the keys not updated.

    ``rows`` are ``(key, *values)`` in ``fields`` order (``None`` keeps the column).
    Rows are locked in primary-key order (concurrent runs queue, never deadlock); the
    keys without a row, or already holding the ``only_if_distinct`` constants, return.

    Note:
        Like ``bulk_update``, this skips ``Model.save()`` and signals and fills
        no ``auto_now`` field.
    """
    if not rows:
        return set()
    constants = dict(constants or {})
    statement = _update(using, model, key, tuple(fields), tuple(constants), tuple(only_if_distinct))
    # The arrays' placeholders come first: the CTE precedes SET.
    distinct = [constants[name] for name in only_if_distinct]
    params = [*columns_of(rows, 1 + len(fields)), *constants.values(), *distinct]
    _, (missing,) = execute(using, statement, params)
    return set(missing)


@statement_text
def _update(
    connection, model: Model, key: str, fields: Names, constants: Names, only: Names
) -> str:
    assignments = [
        f"{name} = COALESCE(v.{name}, t.{name})" for name in each(connection, model, fields)
    ]
    assignments += [f"{name} = %s" for name in each(connection, model, constants)]
    distinct = " OR ".join(
        f"t.{name} IS DISTINCT FROM %s" for name in each(connection, model, only)
    )
    return (
        "WITH v AS MATERIALIZED (SELECT * FROM {source} AS v ({names})), "
        "locked AS MATERIALIZED (SELECT {pk}, {key} FROM {table} "
        "WHERE {key} = ANY(ARRAY(SELECT v.{key} FROM v)) ORDER BY {pk} FOR NO KEY UPDATE), "
        "changed AS (UPDATE {table} AS t SET {assignments} FROM locked "
        "JOIN v ON v.{key} = locked.{key} WHERE t.{pk} = locked.{pk}{distinct} RETURNING t.{key}) "
        "SELECT ARRAY(SELECT v.{key} FROM v WHERE NOT EXISTS "
        "(SELECT FROM changed WHERE changed.{key} = v.{key}))"
    ).format(
        table=quoted(connection, model),
        assignments=", ".join(assignments),
        distinct=f" AND ({distinct})" if only else "",
        source=unnest(connection, *((model, name) for name in (key, *fields))),
        names=quoted(connection, model, key, *fields),
        pk=quoted(connection, model, model._meta.pk.name),
        key=quoted(connection, model, key),
    )


def existing_ids(using: str, wanted: Sequence[tuple[Model, Iterable[int]]]) -> list[set[int]]:
    """Which of the given primary keys exist, per model, in one statement (``read_by_key``)."""
    lookups = [(model, model._meta.pk.name, ids, [model._meta.pk.name]) for model, ids in wanted]
    return [{pk for (pk,) in rows} for rows in read_by_key(using, lookups)]


def read_by_key(
    using: str, lookups: Sequence[tuple[Model, str, Iterable[Any], Sequence[str]]]
) -> list[list[tuple[Any, ...]]]:
    """Rows of several tables found by a key, in one statement.

    Each lookup ``(model, key, values, fields)`` gives the ``fields`` of the
    rows whose ``key`` is among ``values``, as tuples in primary-key order.
    """
    shape = tuple((model, key, tuple(fields)) for model, key, _, fields in lookups)
    params = [
        array_value(sorted(set(values)))
        for _, _, values, fields in lookups
        for _ in fields  # the same array for each of the table's fields
    ]
    _, found = execute(using, _read_by_key(using, shape), params)
    tables, position = [], 0
    for _, _, _, fields in lookups:
        tables.append(list(zip(*found[position : position + len(fields)], strict=True)))
        position += len(fields)
    return tables


@statement_text
def _read_by_key(connection, shape: tuple[tuple[Model, str, Names], ...]) -> str:
    selects: list[str] = []
    for model, key, fields in shape:
        table, key_column = quoted(connection, model), quoted(connection, model, key)
        type_ = array_type(model_field(model, key), connection)
        pk = quoted(connection, model, model._meta.pk.name)
        selects.extend(
            f"ARRAY(SELECT {quoted(connection, model, name)} FROM {table} "
            f"WHERE {key_column} = ANY({ARRAY}::{type_}[]) ORDER BY {pk})"
            for name in fields
        )
    return "SELECT " + ", ".join(selects)


def add_to(
    model: Model, field: str, amounts: Mapping[int, int], *, using: str, guard: bool = False
) -> set[int]:
    """``field = field + amount`` by primary key in one statement; return the ids changed.

    The rows are locked in primary-key order, then updated; an id without a row
    is left out. With ``guard``, a row changes only if ``field`` stays at zero
    or above, and one left unchanged raises ``IntegrityError`` (the chunk rolls
    back): the last defence behind the callers' lock-then-decide logic.
    """
    if not amounts:
        return set()
    ids = sorted(amounts)

    def run(cursor, text):
        cursor.execute(
            text, {"ids": array_value(ids), "amounts": array_value([amounts[key] for key in ids])}
        )
        return {changed for (changed,) in cursor.fetchall()}

    changed = through_django(using, _add_to(using, model, field, guard), run)
    if guard and len(changed) != len(ids):
        missing = len(ids) - len(changed)
        raise IntegrityError(GUARD_FAILED.format(field=field, missing=missing, total=len(ids)))
    return changed


@statement_text
def _add_to(connection, model: Model, field: str, guard: bool) -> str:
    target = quoted(connection, model, field)
    return (
        "WITH locked AS MATERIALIZED (SELECT {pk} FROM {table} "
        "WHERE {pk} = ANY(%(ids)s::bigint[]) ORDER BY {pk} FOR NO KEY UPDATE) "
        "UPDATE {table} AS t SET {field} = t.{field} + v.amount "
        "FROM locked JOIN unnest(%(ids)s::bigint[], %(amounts)s::bigint[]) AS v (id, amount) "
        "ON v.id = locked.{pk} "
        "WHERE t.{pk} = locked.{pk}{guard} RETURNING t.{pk}"
    ).format(
        table=quoted(connection, model),
        field=target,
        pk=quoted(connection, model, model._meta.pk.name),
        guard=f" AND t.{target} + v.amount >= 0" if guard else "",
    )
