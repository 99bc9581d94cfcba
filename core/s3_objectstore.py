"""The S3 object store (any S3-compatible server, through boto3) behind core.objectstore's
interface, with one retry policy of its own for a store that is away."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from core.objectstore import (
    CHUNK_BYTES,
    ObjectNotFound,
    ObjectStoreConfig,
    ObjectStoreUnavailable,
    ObjectWriter,
    store_error,
)

T = TypeVar("T")
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0  # waiting for an answer (per socket read, not per object)
PART_BYTES = 5 * 1024 * 1024  # S3's smallest multipart part: what a streamed write holds


class S3ObjectStore:
    """Any S3-compatible server (AWS, Ceph radosgw, MinIO…) through boto3.

    Non-AWS servers disagree on boto3's newer default checksums, so they are only sent or
    checked when an operation requires them; our own sha256 manifests cover integrity.
    """

    def __init__(self, config: ObjectStoreConfig, retries: int = 8) -> None:
        bucket, _, prefix = config.url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"object_store: no bucket in {config.url!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.retries = retries
        self.client = self._client(config, config.endpoint_url)
        # Presigned URLs are used by the API's clients, who may know the store by another
        # name than the servers do (compose: s3:9000 inside, 127.0.0.1:9000 outside). The
        # signature covers the host, so they are signed for the public endpoint.
        self.presigner = (
            self._client(config, config.public_endpoint_url)
            if config.public_endpoint_url
            else self.client
        )

    @staticmethod
    def _client(config: ObjectStoreConfig, endpoint_url: str | None) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            region_name=config.region,
            config=Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"},
                signature_version="s3v4",  # presigned URLs: SigV2 is refused by many servers
                # One retry policy, ours (`_with_backoff`): botocore's own tries would
                # multiply its waits and hide how many tries a call really made.
                retries={"total_max_attempts": 1, "mode": "standard"},
                # A store that accepts no connection, or answers nothing, within these is
                # away (botocore's 60 s each, times its tries and ours, kept one call
                # hanging for many minutes on a stopped server).
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
            ),
        )

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"object key escapes the store: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _with_backoff(self, call: Callable[[], T]) -> T:
        """Retries the store being away (server restarting, connection refused or cut,
        timeouts, 5xx) with backoff; past the last try raises `ObjectStoreUnavailable`."""
        delay = 0.5
        for attempt in range(self.retries):
            try:
                return call()
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                if attempt == self.retries - 1:
                    store_error("gave_up", exc)
                    raise ObjectStoreUnavailable(
                        f"object store unavailable after {self.retries} tries: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                store_error("retried", exc)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    def _is_missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def put_bytes(self, key: str, data: bytes) -> None:
        self._with_backoff(
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        )

    def put_file(self, key: str, path: Path) -> None:
        # upload_file switches to multipart for large files; S3 only exposes the object
        # once the whole upload completes, so readers never see part of it.
        self._with_backoff(lambda: self.client.upload_file(str(path), self.bucket, self._key(key)))

    def open_writer(self, key: str) -> ObjectWriter:
        return _S3Writer(self, self._key(key))

    def _get_object(self, key: str) -> dict[str, Any]:
        """GetObject, retried; a missing key raises `ObjectNotFound` before any byte is read."""
        from botocore.exceptions import ClientError

        try:
            return self._with_backoff(
                lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            )
        except ClientError as exc:
            if self._is_missing(exc):
                raise ObjectNotFound(key) from exc
            raise

    def get_bytes(self, key: str) -> bytes:
        body: bytes = self._get_object(key)["Body"].read()
        return body

    def download(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._with_backoff(
                lambda: self.client.download_file(self.bucket, self._key(key), str(path))
            )
        except ClientError as exc:
            if self._is_missing(exc):
                raise ObjectNotFound(key) from exc
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._with_backoff(
                lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            )
        except ClientError as exc:
            if self._is_missing(exc):
                return False
            raise
        return True

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        full_prefix = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(f"{self.prefix}/") if self.prefix else 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for item in page.get("Contents", []):
                yield item["Key"][strip:]

    def list(self, prefix: str) -> list[str]:
        return self._with_backoff(lambda: sorted(self._iter_keys(prefix)))

    def delete(self, key: str) -> None:
        self._with_backoff(
            lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        )

    def iter_chunks(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The object in chunks; requested now, so a missing key raises before the first one."""
        chunks: Iterator[bytes] = self._get_object(key)["Body"].iter_chunks(chunk_bytes)
        return chunks

    def presigned_url(self, key: str, expires_s: int = 300) -> str | None:
        url: str = self.presigner.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_s,
        )
        return url


class _S3Writer:
    """A multipart upload holding at most one part (PART_BYTES) in memory; an object
    smaller than one part is one PUT. S3 shows it only once completed; `abort` removes the
    parts already sent."""

    def __init__(self, store: S3ObjectStore, key: str) -> None:
        self.store = store
        self.key = key
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= PART_BYTES:
            part = bytes(self.buffer[:PART_BYTES])
            del self.buffer[:PART_BYTES]
            self._send(part)

    def _send(self, part: bytes) -> None:
        client, bucket = self.store.client, self.store.bucket
        if self.upload_id is None:
            created = self.store._with_backoff(
                lambda: client.create_multipart_upload(Bucket=bucket, Key=self.key)
            )
            self.upload_id = str(created["UploadId"])
        number = len(self.parts) + 1
        sent = self.store._with_backoff(
            lambda: client.upload_part(
                Bucket=bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=part
            )
        )
        self.parts.append({"PartNumber": number, "ETag": sent["ETag"]})

    def commit(self) -> None:
        client, bucket = self.store.client, self.store.bucket
        if self.upload_id is None:
            body = bytes(self.buffer)
            self.store._with_backoff(
                lambda: client.put_object(Bucket=bucket, Key=self.key, Body=body)
            )
            return
        if self.buffer:
            self._send(bytes(self.buffer))
            self.buffer.clear()
        self.store._with_backoff(
            lambda: client.complete_multipart_upload(
                Bucket=bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
            )
        )

    def abort(self) -> None:
        self.buffer.clear()
        if self.upload_id is not None:
            client, bucket = self.store.client, self.store.bucket
            self.store._with_backoff(
                lambda: client.abort_multipart_upload(
                    Bucket=bucket, Key=self.key, UploadId=self.upload_id
                )
            )


def _is_transient(exc: BaseException) -> bool:
    """Whether an S3 call failed because the store is away rather than because of the
    request: no connection, a connection cut or timed out, or a 5xx (also when boto3's
    upload wraps it: S3UploadFailedError keeps the ClientError as its context)."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionError | HTTPClientError):
            return True
        if isinstance(seen, ClientError):
            status = seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return int(status) >= 500
        seen = seen.__cause__ or seen.__context__
    return False
