"""One HTTP client for lorafleet's REST API (CLI, demo, tests, benches): files, jobs, and
`follow`, a job's live events that survive a server restart without replaying any."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}


class ApiError(Exception):
    """The API answered with its error envelope (or a non-2xx status)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message


class LorafleetClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> LorafleetClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.is_success:
            return response.json()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise ApiError(response.status_code, message)

    # ---- files ----
    def upload_file(self, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
        with open(path, "rb") as body:
            response = self.http.post(
                "/v1/files", files={"file": (path.name, body)}, data={"purpose": purpose}
            )
        return dict(self._json(response))

    def upload_records(self, name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        body = "\n".join(json.dumps(r) for r in records).encode()
        response = self.http.post(
            "/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"}
        )
        return dict(self._json(response))

    # ---- jobs ----
    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._json(self.http.post("/v1/fine_tuning/jobs", json=body)))

    def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        page = self._json(self.http.get("/v1/fine_tuning/jobs", params={"limit": limit}))
        return list(page["data"])

    def get_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.get(f"/v1/fine_tuning/jobs/{job_id}")))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")))

    def pause_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.post(f"/v1/fine_tuning/jobs/{job_id}/pause")))

    def resume_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.post(f"/v1/fine_tuning/jobs/{job_id}/resume")))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Every event of a job, oldest first, read through the paginated endpoint."""
        found: list[dict[str, Any]] = []
        after = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            page = self._json(self.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params))
            found.extend(page["data"])
            if not page["has_more"]:
                return found[::-1]
            after = page["data"][-1]["id"]

    def wait(self, job_id: str, timeout: float = 600, interval: float = 0.5) -> dict[str, Any]:
        """Polls until the job ends; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job_id} still {job['status']} after {timeout} s")
            time.sleep(interval)

    def download_adapter(self, job_id: str, target: Path) -> Path:
        """The job's PEFT adapter folder, unpacked into `target`."""
        response = self.http.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", follow_redirects=True)
        if not response.is_success:
            self._json(response)
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
            tar.extractall(target, filter="data")
        return target

    # ---- merged weights (GET …/merged: 202 while merging, 200 with the files) ----
    def merged_weights(
        self, job_id: str, scale: float = 1.0, checkpoint: str | None = None
    ) -> dict[str, Any]:
        """The merge's state (`status` queued, running or succeeded, with `files` once done);
        the first call asks for it."""
        path = f"/v1/fine_tuning/jobs/{job_id}"
        path += f"/checkpoints/{checkpoint}/merged" if checkpoint else "/merged"
        answer: dict[str, Any] = self._json(self.http.get(path, params={"scale": scale}))
        return answer

    def wait_merged(
        self,
        job_id: str,
        scale: float = 1.0,
        checkpoint: str | None = None,
        timeout: float = 3600,
        interval: float = 1.0,
        on_status: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Asks until the merge is listed; `on_status` hears each state seen."""
        deadline = time.monotonic() + timeout
        while True:
            listing = self.merged_weights(job_id, scale, checkpoint)
            if on_status is not None:
                on_status(listing["status"])
            if listing["status"] == "succeeded":
                return listing
            if time.monotonic() > deadline:
                raise TimeoutError(f"merge of {job_id} still {listing['status']} after {timeout} s")
            time.sleep(interval)

    def download_merged(
        self,
        listing: dict[str, Any],
        target: Path,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Path:
        """Every listed file into `target`, streamed and checked against its sha256 (a
        file that does not match is not kept). A presigned URL is fetched without this
        client's API key (S3 refuses a second credential); the API's own with it."""
        target.mkdir(parents=True, exist_ok=True)
        for item in listing["files"]:
            own = item["url"].startswith(str(self.http.base_url).rstrip("/") + "/")
            http = self.http if own else httpx.Client(timeout=self.http.timeout)
            partial = target / f".{item['name']}.partial"
            digest = hashlib.sha256()
            try:
                with http.stream("GET", item["url"], follow_redirects=True) as response:
                    if not response.is_success:
                        response.read()
                        self._json(response)
                    with partial.open("wb") as out:
                        for chunk in response.iter_bytes(1024 * 1024):
                            out.write(chunk)
                            digest.update(chunk)
                            if on_bytes is not None:
                                on_bytes(len(chunk))
                if digest.hexdigest() != item["sha256"]:
                    raise ApiError(502, f"{item['name']} does not match its sha256")
                partial.rename(target / item["name"])
            finally:
                partial.unlink(missing_ok=True)
                if not own:
                    http.close()
        return target

    def follow(
        self, job_id: str, after: str | None = None, reconnect_for: float = 180
    ) -> Iterator[dict[str, Any]]:
        """A job's events, oldest first, live until it ends. A dropped connection (a server
        restart) is retried for `reconnect_for` seconds, resuming with `Last-Event-ID`, so
        no event is delivered twice."""
        last_id = after
        down_since: float | None = None
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/fine_tuning/jobs/{job_id}/events",
                    params={"stream": "true"},
                    headers=headers,
                    timeout=httpx.Timeout(30, read=None),
                ) as response:
                    if not response.is_success:
                        response.read()
                        self._json(response)
                    down_since = None
                    for event_id, data in _server_sent_events(response.iter_lines()):
                        if data == "[DONE]":
                            return
                        last_id = event_id or last_id
                        yield json.loads(data)
            except httpx.TransportError:
                pass
            # The stream ended without [DONE]: the server went away; try again.
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > reconnect_for:
                raise ApiError(503, f"lost the server for {reconnect_for} s following {job_id}")
            time.sleep(0.5)


def _server_sent_events(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(id, data) per event of a text/event-stream."""
    event_id: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
