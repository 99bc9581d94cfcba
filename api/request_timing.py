"""API latency by route for /metrics: labelled by the route's template (`/v1/fine_tuning/
jobs/{job_id}`), never by the raw path, so no job id becomes a label."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response

from orchestrator.metrics import API_SECONDS


async def time_requests(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    started = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    template = getattr(route, "path", None) or "unmatched"
    API_SECONDS.labels(method=request.method, route=template).observe(time.perf_counter() - started)
    return response
