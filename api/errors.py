"""Every error leaves the API in OpenAI's envelope: {"error": {message, type, param, code}}.

The one place where domain exceptions become HTTP statuses.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.base_catalog import CatalogError
from core.objectstore import ObjectStoreUnavailable
from orchestrator.errors import (
    Conflict,
    Forbidden,
    IdempotencyMismatch,
    InvalidRequest,
    InvalidTransition,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
)

log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": param, "code": code}},
    )


_LOCATIONS = ("body", "query", "path", "header")


def _param_of(loc: tuple[int | str, ...]) -> str:
    """("body", "lora", "r") → "lora.r"; ("query", "limit") → "limit".

    Pydantic adds the union member it tried ("literal['all-linear']", "list[str]") to the
    path; those are not fields, so they are left out.
    """
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    fields = [p for p in parts if p.replace("_", "").replace("-", "").isalnum()]
    return ".".join(fields) or "body"


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    problems = [f"{_param_of(tuple(e['loc']))}: {e['msg']}" for e in errors]
    first = _param_of(tuple(errors[0]["loc"])) if errors else None
    return error_response(400, "; ".join(problems), param=first, code="invalid_value")


async def _invalid_request(request: Request, exc: InvalidRequest) -> JSONResponse:
    status = 413 if isinstance(exc, PayloadTooLarge) else 400
    response = error_response(status, exc.message, exc.param, exc.code)
    if isinstance(exc, PayloadTooLarge) or getattr(request.state, "body_left_unread", False):
        # The server would otherwise read (and discard) the rest of the body to keep the
        # connection: closing it is what cuts an oversized upload off.
        response.headers["Connection"] = "close"
    return response


async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
    return error_response(404, str(exc), exc.param, "not_found")


async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
    return error_response(409, exc.message, exc.param, "conflict")


async def _transition(_: Request, exc: InvalidTransition) -> JSONResponse:
    return error_response(409, str(exc), None, "conflict")


async def _unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
    response = error_response(401, exc.message, None, "invalid_api_key")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def _rate_limited(_: Request, exc: RateLimited) -> JSONResponse:
    response = error_response(429, exc.message, exc.param, "rate_limit_exceeded")
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response


async def _forbidden(_: Request, exc: Forbidden) -> JSONResponse:
    return error_response(403, exc.message, exc.param, "forbidden")


async def _idempotency(_: Request, exc: IdempotencyMismatch) -> JSONResponse:
    return error_response(422, exc.message, "Idempotency-Key", "idempotency_key_reused")


DATABASE_RETRY_AFTER_S = 5


async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
    """The database is away (down, restarting, unreachable): 503 with Retry-After, so clients
    retry instead of treating it as a bug; any other database error stays a 500."""
    if isinstance(exc, DataError):
        # A value the database cannot hold (PostgreSQL: a NUL, an over-long string): the
        # schemas bound every field, so this is a value they missed, and still the caller's.
        log.warning("database refused a request's value: %s", exc.orig or exc)
        return error_response(400, "a value in the request cannot be stored", None, "invalid_value")
    if not (exc.connection_invalidated or _is_connection_error(exc)):
        log.error("database error", exc_info=exc)
        return error_response(500, "internal error; the server log has the details")
    log.warning("database unavailable: %s", exc.orig or exc)
    response = error_response(
        503, "the database is unavailable; retry shortly", None, "service_unavailable"
    )
    response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
    return response


STORE_RETRY_AFTER_S = 10


async def _object_store(_: Request, exc: ObjectStoreUnavailable) -> JSONResponse:
    """The object store is away (its every retry failed): 503 with Retry-After, as for the
    database, not a 500 with a traceback in the log."""
    log.warning("object store unavailable: %s", exc)
    response = error_response(
        503, "the object store is unavailable; retry shortly", None, "service_unavailable"
    )
    response.headers["Retry-After"] = str(STORE_RETRY_AFTER_S)
    return response


def _is_connection_error(exc: DBAPIError) -> bool:
    # OperationalError covers a refused or dropped connection on psycopg and SQLite alike;
    # InterfaceError a connection closed under the driver.
    return isinstance(exc, OperationalError | InterfaceError)


async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


async def _catalog(_: Request, exc: CatalogError) -> JSONResponse:
    return error_response(400, exc.message, exc.param, "invalid_value")


class UnexpectedErrors:
    """Logs an unhandled exception with its traceback once and answers 500 in the envelope.

    An `Exception` handler is not enough: Starlette calls it and then re-raises, so the
    server logs the same traceback a second time ("Exception in ASGI application").
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                return  # the status line is out; the client sees the body cut short
            response = error_response(500, "internal error; the server log has the details")
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidRequest, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(NotFound, _not_found)  # type: ignore[arg-type]
    app.add_exception_handler(Conflict, _conflict)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidTransition, _transition)  # type: ignore[arg-type]
    app.add_exception_handler(Unauthorized, _unauthorized)  # type: ignore[arg-type]
    app.add_exception_handler(RateLimited, _rate_limited)  # type: ignore[arg-type]
    app.add_exception_handler(Forbidden, _forbidden)  # type: ignore[arg-type]
    app.add_exception_handler(IdempotencyMismatch, _idempotency)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(DBAPIError, _database)  # type: ignore[arg-type]
    app.add_exception_handler(ObjectStoreUnavailable, _object_store)  # type: ignore[arg-type]
    app.add_exception_handler(CatalogError, _catalog)  # type: ignore[arg-type]
    app.add_middleware(UnexpectedErrors)
