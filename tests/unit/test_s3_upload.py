"""MultipartUpload against moto's S3 server: what is stored, and the memory it holds (two part buffers, reused);
the shared session's trimmed endpoint data."""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from typing import Any

import boto3
import pytest

from runbook_operator.clients import s3
from runbook_operator.clients.s3 import MultipartUpload, make_client
from runbook_operator.models.sources import S3Location
from tests.services import S3Server

PART = 5 * 1024 * 1024  # S3's smallest part


class RecordingParts:
    """A real S3 client that keeps each part's body object (so a new buffer per part would show as a new object)
    and, as each part's request ends, the bytes written to the upload so far."""

    def __init__(self, client: Any, upload_size: Any) -> None:
        self._client, self._upload_size = client, upload_size
        self.bodies: list[Any] = []
        self.written_when_stored: list[int] = []
        self.concurrent, self.most_concurrent = 0, 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def upload_part(self, **kwargs: Any) -> Any:
        with self._lock:
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        self.bodies.append(kwargs["Body"])
        try:
            response = self._client.upload_part(**kwargs)
            time.sleep(0.05)  # a slow store: the producer runs ahead as far as the upload lets it
            self.written_when_stored.append(self._upload_size())
            return response
        finally:
            with self._lock:
                self.concurrent -= 1


@pytest.fixture
def bucket(s3_server: S3Server) -> tuple[S3Location, Any]:
    name = f"upload-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=name)
    location = S3Location(bucket=name, endpoint=s3_server.endpoint, server_side_encryption="None")
    return location, make_client(location, s3_server.access_key, s3_server.secret_key)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "one-buffer"])
def test_parts_are_sent_from_reused_buffers_one_in_flight_while_the_next_fills(
    bucket: tuple[S3Location, Any], s3_server: S3Server, overlap: bool
) -> None:
    location, client = bucket
    data = random.Random(7).randbytes(4 * PART + 12_345)
    chunk = 64 * 1024 + 7  # chunks that straddle part boundaries
    upload: MultipartUpload | None = None
    recording = RecordingParts(client, lambda: upload.size if upload else 0)
    upload = MultipartUpload(recording, location, "x/data", part_size=PART, overlap=overlap)  # type: ignore[arg-type]
    for start in range(0, len(data), chunk):
        upload.write(data[start : start + chunk])
    upload.complete()

    stored = s3_server.client().get_object(Bucket=location.bucket, Key="x/data")["Body"].read()
    assert stored == data
    assert (upload.size, upload.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert len(recording.bodies) == 5
    buffers = 2 if overlap else 1
    assert len({id(body) for body in recording.bodies}) == buffers  # never a copy per part
    assert recording.most_concurrent == 1
    for number, written in enumerate(recording.written_when_stored[:-1], start=1):
        # while part n was being stored, the producer could fill part n + 1 (overlap) and then had to wait
        assert written <= (number + buffers - 1) * PART + chunk, (number, written)
    assert upload._buffer == upload._sent == bytearray()  # released once complete


def test_an_empty_upload_stores_an_empty_object(bucket: tuple[S3Location, Any], s3_server: S3Server) -> None:
    location, client = bucket
    upload = MultipartUpload(client, location, "x/empty", part_size=PART)
    upload.complete()
    assert s3_server.client().get_object(Bucket=location.bucket, Key="x/empty")["Body"].read() == b""
    assert upload.size == 0


def test_abort_leaves_no_upload_and_no_object(bucket: tuple[S3Location, Any], s3_server: S3Server) -> None:
    location, client = bucket
    upload = MultipartUpload(client, location, "x/aborted", part_size=PART)
    upload.write(bytes(PART + 10))
    upload.abort()
    s3 = s3_server.client()
    assert not s3.list_multipart_uploads(Bucket=location.bucket).get("Uploads")
    assert s3.list_objects_v2(Bucket=location.bucket).get("KeyCount") == 0


def test_the_shared_session_keeps_the_endpoint_data_of_s3_and_sts_only_and_resolves_as_before() -> None:
    session = s3._session()
    endpoints, _ = session._session.get_component("data_loader").load_data_with_path("endpoints")
    assert {name for p in endpoints["partitions"] for name in p["services"]} == set(s3.ENDPOINT_SERVICES)
    full = boto3.session.Session()  # botocore's whole data
    for service, region in [("s3", "eu-west-1"), ("s3", "cn-north-1"), ("sts", "us-gov-west-1"), ("ec2", "us-east-1")]:
        ours = session.client(service, region_name=region, aws_access_key_id="a", aws_secret_access_key="b")
        theirs = full.client(service, region_name=region, aws_access_key_id="a", aws_secret_access_key="b")
        assert (ours.meta.endpoint_url, ours.meta.region_name) == (theirs.meta.endpoint_url, theirs.meta.region_name)
        assert ours.meta.partition == theirs.meta.partition
