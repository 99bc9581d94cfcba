"""The API's job reads (GET job, the job list) as plain columns, compiled once per shape.

A job is read as a named tuple of its columns (JobFields) that reads like a JobRow: no
session, identity map or instance state, and no statement built per call
(`store/prepared.py`). Its JSON columns arrive as their text, on SQLite and PostgreSQL alike,
and are decoded when read. A list page can also be read as (id, version) pairs only: the
API keeps response bodies by that pair, which every write to a job changes (migration 0008).
Read-only: changes go through the store's named operations.
"""

from __future__ import annotations

import json
from collections import namedtuple
from typing import TYPE_CHECKING, Any

from pydantic_core import from_json
from sqlalchemy import (
    JSON,
    BigInteger,
    Engine,
    Integer,
    Select,
    String,
    Text,
    and_,
    bindparam,
    cast,
    inspect,
    or_,
    select,
)

from core.job_settings import JobSettings
from orchestrator.errors import NotFound
from orchestrator.store.prepared import PreparedRead, read_cursor
from orchestrator.tables import JobRow, JobSettingsJSON

# JobRow's columns, labelled with its attribute names (`user_metadata`, not the column's
# `metadata`); the JSON ones as text, labelled `<name>_json`.
JOB_FIELDS = [
    cast(column, Text).label(f"{attribute.key}_json")
    if isinstance(column.type, JSON | JobSettingsJSON)
    else column.label(attribute.key)
    for attribute in inspect(JobRow).column_attrs
    for column in attribute.columns
]


def read_json(text: str | None) -> Any:
    """`json.loads`, ~4x faster (pydantic-core's parser), which gives the same values for what
    `json.dumps` writes (tests/orchestrator/test_prepared_reads.py); what it refuses and
    json.loads takes, a lone surrogate (escaped or not), still decodes as before. SQL NULL (a
    column never written) reads as None, as JSON null does."""
    if text is None:
        return None
    try:
        return from_json(text)
    except (ValueError, TypeError):
        return json.loads(text)


class JobFields(namedtuple("JobColumns", [c.key for c in JOB_FIELDS])):  # type: ignore[misc]
    """A job as read for the API: JobRow's attributes, the JSON ones decoded on each read
    (each call returns a fresh object, so the row itself never changes)."""

    __slots__ = ()

    if TYPE_CHECKING:  # the columns are fields made from JobRow's mapping, unseen by mypy

        def __getattr__(self, name: str) -> Any: ...

    @property
    def settings(self) -> JobSettings:
        return JobSettings.stored(read_json(self.settings_json))

    @property
    def user_metadata(self) -> dict[str, str] | None:
        return read_json(self.user_metadata_json)  # type: ignore[no-any-return]

    @property
    def result_files(self) -> list[str] | None:
        return read_json(self.result_files_json)  # type: ignore[no-any-return]


NEWEST_FIRST = (JobRow.created_at.desc(), JobRow.id.desc())
# A job has at most 16 metadata keys (the create request's limit), so a list filtered on more
# finds nothing; such shapes are compiled per call rather than kept.
KEPT_FILTER_SHAPES = 16


def job_by_id() -> Select[Any]:
    return select(*JOB_FIELDS).where(
        JobRow.id == bindparam("job_id"), JobRow.tenant == bindparam("tenant")
    )


def anchor_of_page() -> Select[int, str]:
    """Where the page after `after` starts: that job's sort key, within the tenant."""
    return select(JobRow.created_at, JobRow.id).where(
        JobRow.id == bindparam("after"), JobRow.tenant == bindparam("tenant")
    )


# What a page of versions reads of each job: enough to tell a body already rendered.
VERSION_FIELDS = [JobRow.id.label("id"), JobRow.version.label("version")]


def page_of_jobs(filters: int, after: bool, fields: list[Any] = JOB_FIELDS) -> Select[Any]:
    """Newest first, `limit` rows of `fields`; `filters` metadata equalities (`name_i` =
    `value_i`); with `after`, only jobs older than the anchor (`anchor_created_at`,
    `anchor_id`)."""
    # ix_jobs_tenant_newest gives the order: the page is read newest first along the index
    # and stops after `limit` rows, no sort (on SQLite 0.13 ms for 21 of 300 jobs, against
    # 0.21 ms for the page's ids in a subquery and a sort of their rows).
    page = select(*fields).where(JobRow.tenant == bindparam("tenant"))
    for i in range(filters):
        # A JSON field compared as text on SQLite and PostgreSQL alike, in SQL: a page never
        # loads more than limit rows.
        name = bindparam(f"name_{i}", type_=JSON.JSONStrIndexType())
        page = page.where(
            JobRow.user_metadata[name].as_string() == bindparam(f"value_{i}", type_=String())
        )
    if after:
        created_at = bindparam("anchor_created_at", type_=BigInteger())
        page = page.where(
            or_(
                JobRow.created_at < created_at,
                and_(JobRow.created_at == created_at, JobRow.id < bindparam("anchor_id")),
            )
        )
    return page.order_by(*NEWEST_FIRST).limit(bindparam("limit", type_=Integer()))


class JobReads:
    """GET job and the job list for one engine; each needs one pooled connection."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._job = PreparedRead(engine, job_by_id(), JobFields)
        self._anchor = PreparedRead(engine, anchor_of_page())
        self._pages: dict[tuple[int, bool, bool], PreparedRead] = {}

    def job(self, tenant: str, job_id: str) -> JobFields:
        with read_cursor(self.engine) as cursor:
            row = self._job.first(cursor, job_id=job_id, tenant=tenant)
        if row is None:
            raise NotFound("fine-tuning job", job_id)
        return row

    def page(
        self, tenant: str, after: str | None, limit: int, metadata: dict[str, str] | None
    ) -> tuple[list[JobFields], bool]:
        rows = self._page(tenant, after, limit, metadata)
        return rows[:limit], len(rows) > limit

    def page_versions(
        self, tenant: str, after: str | None, limit: int, metadata: dict[str, str] | None
    ) -> tuple[list[tuple[str, int]], bool]:
        """The page as (id, version) pairs: two small columns per job, not its whole row."""
        rows = self._page(tenant, after, limit, metadata, versions=True)
        return [(row.id, row.version) for row in rows[:limit]], len(rows) > limit

    def _page(
        self,
        tenant: str,
        after: str | None,
        limit: int,
        metadata: dict[str, str] | None,
        versions: bool = False,
    ) -> list[Any]:
        """Up to limit + 1 rows (one more tells whether a next page exists)."""
        filters = list((metadata or {}).items())
        values: dict[str, Any] = {"tenant": tenant, "limit": limit + 1}
        for i, (name, value) in enumerate(filters):
            values[f"name_{i}"], values[f"value_{i}"] = name, value
        page = self.page_statement(len(filters), bool(after), versions)
        with read_cursor(self.engine) as cursor:
            if after:
                anchor = self._anchor.first(cursor, after=after, tenant=tenant)
                if anchor is None:
                    raise NotFound("fine-tuning job", after)
                values["anchor_created_at"], values["anchor_id"] = anchor
            return page.rows(cursor, **values)

    def page_statement(self, filters: int, after: bool, versions: bool = False) -> PreparedRead:
        """The page's statement, whole rows or (with `versions`) (id, version) pairs."""
        shape = (filters, after, versions)
        page = self._pages.get(shape)
        if page is None:
            if versions:
                page = PreparedRead(self.engine, page_of_jobs(filters, after, VERSION_FIELDS))
            else:
                page = PreparedRead(self.engine, page_of_jobs(filters, after), JobFields)
            if filters <= KEPT_FILTER_SHAPES:
                self._pages[shape] = page
        return page
