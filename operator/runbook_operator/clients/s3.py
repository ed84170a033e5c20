"""S3 (or any S3-compatible service) through boto3: streaming multipart uploads, listing, deletion."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from ..models.sources import S3Location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PART_SIZE = 8 * 1024 * 1024  # S3's minimum part is 5 MiB; 8 MiB keeps memory bounded and requests few


def make_client(
    location: S3Location, access_key_id: str | None = None, secret_access_key: str | None = None
) -> S3Client:
    """A client for the location; ambient credentials (IRSA, env) when no keys are given."""
    return boto3.client(
        "s3",
        region_name=location.region,
        endpoint_url=location.endpoint,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"}),
    )


def _sse(location: S3Location) -> dict[str, Any]:
    if location.server_side_encryption == "None":
        return {}
    args: dict[str, Any] = {"ServerSideEncryption": location.server_side_encryption}
    if location.kms_key_id:
        args["SSEKMSKeyId"] = location.kms_key_id
    return args


@dataclass
class MultipartUpload:
    """A streaming upload: ``write`` buffers at most one part while the previous one is sent (so the producer
    keeps going during the request), ``complete`` commits, ``abort`` discards. Memory: two parts at most.

    The SHA-256 and size of everything written are computed on the way.
    """

    client: S3Client
    location: S3Location
    key: str
    part_size: int = PART_SIZE
    size: int = 0
    _sha256: Any = field(default_factory=hashlib.sha256)
    _buffer: bytearray = field(default_factory=bytearray)
    _parts: list[dict[str, Any]] = field(default_factory=list)
    _upload_id: str | None = None
    _sender: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="s3-part"))
    _in_flight: Future[None] | None = None

    def __post_init__(self) -> None:
        response = self.client.create_multipart_upload(Bucket=self.location.bucket, Key=self.key, **_sse(self.location))
        self._upload_id = response["UploadId"]

    @property
    def sha256(self) -> str:
        return str(self._sha256.hexdigest())

    def write(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        self.size += len(chunk)
        self._buffer += chunk
        while len(self._buffer) >= self.part_size:
            self._wait()  # the previous part is stored (or its error raised) before the next is copied
            with memoryview(self._buffer) as view:
                part = bytes(view[: self.part_size])
            del self._buffer[: self.part_size]
            self._send(part)

    def _wait(self) -> None:
        if self._in_flight is not None:
            self._in_flight.result()
            self._in_flight = None

    def _send(self, data: bytes) -> None:
        number = len(self._parts) + 1
        self._parts.append({"PartNumber": number})
        self._in_flight = self._sender.submit(self._upload_part, data, number)

    def _upload_part(self, data: bytes, number: int) -> None:
        response = self.client.upload_part(
            Bucket=self.location.bucket, Key=self.key, UploadId=str(self._upload_id), PartNumber=number, Body=data
        )
        self._parts[number - 1]["ETag"] = response["ETag"]

    def complete(self) -> None:
        self._wait()
        if self._buffer or not self._parts:
            self._send(bytes(self._buffer))
            self._buffer.clear()
            self._wait()
        self._sender.shutdown()
        self.client.complete_multipart_upload(
            Bucket=self.location.bucket,
            Key=self.key,
            UploadId=str(self._upload_id),
            MultipartUpload={"Parts": self._parts},  # type: ignore[typeddict-item]
        )

    def abort(self) -> None:
        self._buffer.clear()
        if self._in_flight is not None:
            self._in_flight.exception()  # let the part in flight end; its error is the caller's to report
            self._in_flight = None
        self._sender.shutdown()
        self.client.abort_multipart_upload(Bucket=self.location.bucket, Key=self.key, UploadId=str(self._upload_id))


def put_json(client: S3Client, location: S3Location, key: str, document: dict[str, Any]) -> None:
    body = json.dumps(document, indent=2, sort_keys=True).encode()
    client.put_object(
        Bucket=location.bucket,
        Key=key,
        Body=body,
        ContentType="application/json",
        **_sse(location),
    )


def get_json(client: S3Client, location: S3Location, key: str) -> dict[str, Any]:
    body = client.get_object(Bucket=location.bucket, Key=key)["Body"].read()
    document: dict[str, Any] = json.loads(body)
    return document


def list_keys(client: S3Client, location: S3Location, prefix: str, start_after: str = "") -> Iterator[str]:
    """Every key under the prefix (in key order, after ``start_after`` when given)."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=location.bucket, Prefix=prefix, StartAfter=start_after):
        for item in page.get("Contents", []):
            yield item["Key"]


def delete_keys(client: S3Client, location: S3Location, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        client.delete_objects(Bucket=location.bucket, Delete={"Objects": batch, "Quiet": True})  # type: ignore[typeddict-item]


def ensure_abort_incomplete_uploads(client: S3Client, location: S3Location, days: int = 1) -> bool:
    """A lifecycle rule that aborts multipart uploads left open under the location's prefix (a run killed
    before it could abort). Other rules of the bucket are kept; returns whether the configuration changed."""
    prefix = f"{location.prefix}/" if location.prefix else ""
    rule: dict[str, Any] = {
        "ID": f"runbook-abort-incomplete-uploads:{prefix or '*'}"[:255],
        "Filter": {"Prefix": prefix},
        "Status": "Enabled",
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days},
    }
    try:
        rules = client.get_bucket_lifecycle_configuration(Bucket=location.bucket)["Rules"]
    except client.exceptions.ClientError as error:
        if error.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
            raise
        rules = []
    others = [r for r in rules if r.get("ID") != rule["ID"]]
    if len(others) < len(rules) and next(r for r in rules if r.get("ID") == rule["ID"]) == rule:
        return False
    client.put_bucket_lifecycle_configuration(
        Bucket=location.bucket,
        LifecycleConfiguration={"Rules": [*others, rule]},  # type: ignore[list-item]
    )
    return True
