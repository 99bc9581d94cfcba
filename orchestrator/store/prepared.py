"""Reads compiled once and run on the driver's own cursor: the API's hot reads (GET job, the
job list), where SQLAlchemy's per-call work costs more than the query itself.

`Connection.execute` rebuilds the statement's cache key on every call and goes through an
execution context and a result object: ~140 µs for a one-row SELECT of a job's 24 columns on
SQLite, against ~30 µs for the same SQL on the DBAPI cursor. A `PreparedRead` keeps what
SQLAlchemy would produce anyway (the dialect's SQL text, its bind and result processors, so
JSON columns decode as they do through the ORM, on SQLite and PostgreSQL alike) and runs it
directly. Driver errors are wrapped as SQLAlchemy wraps them (`DBAPIError`, connection
invalidated on a disconnect), so a database outage still answers 503.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, Select
from sqlalchemy.exc import DBAPIError


class PreparedRead:
    """One SELECT with named `bindparam`s, compiled for one engine's dialect."""

    def __init__(
        self,
        engine: Engine,
        statement: Select[*tuple[Any, ...]],
        row_type: type[tuple[Any, ...]] | None = None,
    ) -> None:
        dialect = engine.dialect
        self._compiled = statement.compile(dialect=dialect)
        self.sql = str(self._compiled)
        # qmark (SQLite) takes a tuple in the SQL's order; pyformat (psycopg) a mapping.
        self._positions: list[str] | None = (
            list(self._compiled.positiontup or []) if dialect.positional else None
        )
        self._binds: dict[str, Callable[[Any], Any]] = {}
        for name, bind in self._compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._binds[name] = process
        columns = list(statement.selected_columns)
        self._results: list[Callable[[Any], Any] | None] = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        ]
        # A named tuple class whose fields are the selected columns' keys, in their order.
        self.row_type: Any = row_type or namedtuple("Fields", [c.key for c in columns])  # type: ignore[misc]

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...] | Mapping[str, Any]:
        """The driver's parameters for `values` (plus the statement's own constants, such as
        an OFFSET SQLite adds), bind processors applied."""
        params = self._compiled.construct_params(dict(values))
        for name, process in self._binds.items():
            if name in params:
                params[name] = process(params[name])
        if self._positions is None:
            return params
        return tuple(params[name] for name in self._positions)

    def rows(self, cursor: Any, **values: Any) -> list[Any]:
        """Every row, as named tuples whose fields are the selected columns' keys."""
        cursor.execute(self.sql, self.parameters(values))
        processors = self._results
        make = self.row_type._make
        if not any(processors):
            return [make(row) for row in cursor.fetchall()]
        return [
            make(
                [
                    value if process is None or value is None else process(value)
                    for process, value in zip(processors, row, strict=True)
                ]
            )
            for row in cursor.fetchall()
        ]

    def first(self, cursor: Any, **values: Any) -> Any | None:
        found = self.rows(cursor, **values)
        return found[0] if found else None


@contextmanager
def read_cursor(engine: Engine) -> Iterator[Any]:
    """One pooled connection's cursor for a few reads; a driver error leaves as SQLAlchemy's
    `DBAPIError` (a dropped connection is invalidated, not returned to the pool)."""
    dialect = engine.dialect
    driver_error = dialect.loaded_dbapi.Error
    connection = engine.raw_connection()  # pre-ping and reconnects as the engine does
    cursor = None
    lost = False
    try:
        cursor = connection.cursor()
        yield cursor
    except driver_error as exc:
        lost = dialect.is_disconnect(exc, connection.dbapi_connection, cursor)
        if lost:
            connection.invalidate(exc)  # also hands the record back to the pool
        raise DBAPIError.instance(
            None, None, exc, driver_error, connection_invalidated=lost, dialect=dialect
        ) from exc
    finally:
        if not lost:
            if cursor is not None:
                cursor.close()
            connection.close()  # back to the pool, which rolls back PostgreSQL's implicit BEGIN
