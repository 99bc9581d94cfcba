"""Operations for long-running processes: logging (`LORAFLEET_LOG_FORMAT=json` for one JSON
object per line, with job id, run id and attempt when a log call names them) and a
scheduler's own `/metrics` endpoint."""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from orchestrator.store import JobStore

# Passed as `extra=` by log calls that concern one job or run.
CONTEXT_FIELDS = ("job_id", "run_id", "attempt", "host_id", "tenant")


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({f: getattr(record, f) for f in CONTEXT_FIELDS if hasattr(record, f)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging() -> None:
    handler = logging.StreamHandler()
    if os.environ.get("LORAFLEET_LOG_FORMAT", "").lower() == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def serve_metrics(store: JobStore, host: str, port: int, token: str | None) -> ThreadingHTTPServer:
    """`GET /metrics` of this process (job gauges + its own counters and histograms) on a
    thread; with a token, scrapers must send it as a Bearer token."""
    from api.routers.metrics import exposition

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            given = self.headers.get("Authorization") or ""
            if token and not secrets.compare_digest(given, f"Bearer {token}"):
                self.send_error(401)
                return
            body = exposition(store)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
