"""A file upload read from the request's own byte stream, never spooled.

Starlette's form parser writes every part of a multipart body (up to 1000 of them) to temp
files before a handler runs, whatever the limit. Here the body is parsed as it arrives
(python-multipart's push parser): one file part, a purpose field, and the limit enforced on
the bytes received, so a request past it is answered 413 and never read further. The file's
bytes go to `FileUpload.feed` (line check, then the store, in parts) in batches of
`BATCH_BYTES`, off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from orchestrator.errors import InvalidRequest, PayloadTooLarge
from orchestrator.files import FileUpload

BATCH_BYTES = 1 << 20
FORM_BYTES = 64 * 1024  # what a body may hold beyond the file: boundaries, headers, purpose
MAX_FIELD_BYTES = 256  # the purpose field (and any other small field, which is ignored)
MAX_PARTS = 8
MAX_FILENAME_CHARS = 512  # the database column's length


@dataclass
class ReadUpload:
    """What a multipart upload carried: the file (checked and written) and its fields."""

    upload: FileUpload | None = None
    filename: str = "upload.jsonl"
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    is_file: bool = False
    value: bytearray = field(default_factory=bytearray)


class _Parts:
    """The parser's callbacks: collects headers and field values, and the file's bytes
    until the reading loop hands them on."""

    def __init__(self, start_file: Callable[[str], None]) -> None:
        self.start_file = start_file
        self.current = _Part()
        self.count = 0
        self.file_seen = False
        self.file_bytes = bytearray()
        self.fields: dict[str, str] = {}
        self.ended = False
        self._field_name = b""
        self._field_value = b""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _end(self) -> None:
        self.ended = True

    def _part_begin(self) -> None:
        self.count += 1
        if self.count > MAX_PARTS:
            raise InvalidRequest(f"a file upload has at most {MAX_PARTS} parts", param="file")
        self.current = _Part()
        self._field_name = self._field_value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field_name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._field_value += data[start:end]

    def _header_end(self) -> None:
        self.current.headers[self._field_name.lower()] = self._field_value
        self._field_name = self._field_value = b""

    def _headers_finished(self) -> None:
        disposition = self.current.headers.get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self.current.name = name
        if name != "file":
            return
        if self.file_seen:
            raise InvalidRequest("send one file part, named file", param="file")
        self.file_seen = self.current.is_file = True
        filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
        if "\x00" in filename:
            raise InvalidRequest("the file name must not contain NUL characters", param="file")
        if len(filename) > MAX_FILENAME_CHARS:
            raise InvalidRequest(
                f"the file name is longer than {MAX_FILENAME_CHARS} characters", param="file"
            )
        self.start_file(filename or "upload.jsonl")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.current.is_file:
            self.file_bytes += data[start:end]
            return
        self.current.value += data[start:end]
        if len(self.current.value) > MAX_FIELD_BYTES:
            name = self.current.name or "body"
            raise InvalidRequest(f"{name} is longer than {MAX_FIELD_BYTES} bytes", param=name)

    def _part_end(self) -> None:
        if not self.current.is_file and self.current.name:
            self.fields[self.current.name] = self.current.value.decode("utf-8", "replace")


async def read_upload(
    request: Request, max_bytes: int, new_upload: Callable[[], FileUpload]
) -> ReadUpload:
    """Reads the multipart body of `request` as it arrives, feeding the file part to a
    FileUpload from `new_upload`; PayloadTooLarge as soon as the body passes the limit
    (the rest is never read), InvalidRequest for a body that is not one file upload. On any
    failure the upload is aborted: nothing of it is left in the store."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "file: a file part is required, sent as multipart/form-data", param="file"
        )
    limit = max_bytes + FORM_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"file is larger than the {max_bytes}-byte limit", param="file")

    read = ReadUpload()

    def start_file(filename: str) -> None:
        read.filename = filename
        read.upload = new_upload()

    parts = _Parts(start_file)
    parser = MultipartParser(boundary, parts.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(
                    f"file is larger than the {max_bytes}-byte limit", param="file"
                )
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise InvalidRequest(f"the multipart body is malformed: {exc}", "file") from exc
            if len(parts.file_bytes) >= BATCH_BYTES:
                await _hand_on(parts, read)
        parser.finalize()
        if not parts.ended:
            raise InvalidRequest("the multipart body ends before its closing boundary", "file")
        await _hand_on(parts, read)
    except BaseException:
        request.state.body_left_unread = True  # api/errors.py closes the connection
        if read.upload is not None:
            await run_in_threadpool(read.upload.abort)
        raise
    read.fields = parts.fields
    return read


async def _hand_on(parts: _Parts, read: ReadUpload) -> None:
    if parts.file_bytes and read.upload is not None:
        batch = bytes(parts.file_bytes)
        parts.file_bytes.clear()
        await run_in_threadpool(read.upload.feed, batch)
