"""S3 (or any S3-compatible service) through boto3: streaming multipart uploads, listing, deletion, the
lifecycle rule, and the operator's cache of clients.

Every call has a known worst case: ``Timeouts`` bounds the TCP connect, each wait for response bytes, and the
number of attempts (botocore's standard retry mode, whose backoff before a retry is at most 2^(n-1) s).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import boto3
import botocore.session
from botocore.config import Config

from ..models.sources import S3Location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PART_SIZE = 8 * 1024 * 1024  # S3's minimum part is 5 MiB; 8 MiB keeps memory bounded and requests few
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeouts:
    """Seconds to open a connection and to wait for each read of an answer; attempts in all (the first
    included). ``worst_case``: the longest one call can take (every attempt timing out, plus the backoffs)."""

    connect: float
    read: float
    attempts: int

    @property
    def worst_case(self) -> float:
        backoffs = sum(min(2.0 ** (n - 1), 20.0) for n in range(1, self.attempts))
        return self.attempts * (self.connect + self.read) + backoffs


# The operator's calls (HEAD, lifecycle, listings, manifests, evidence parts) are small: a stuck endpoint costs
# a worker 2 x (5 + 10) + 1 = 31 s at most, 21 s when it accepts the connection and never answers.
OPERATOR_TIMEOUTS = Timeouts(connect=5.0, read=10.0, attempts=2)
# The agents' transfers (8 MiB parts, streamed downloads) in their Jobs: botocore's 60 s reads, 4 attempts.
TRANSFER_TIMEOUTS = Timeouts(connect=10.0, read=60.0, attempts=4)


def make_client(
    location: S3Location,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    *,
    timeouts: Timeouts = TRANSFER_TIMEOUTS,
    pool_size: int = 10,
) -> S3Client:
    """A client for the location; ambient credentials (IRSA, env) when no keys are given. ``pool_size``:
    connections kept open, at least the threads that share the client (botocore's default is 10)."""
    config = Config(
        connect_timeout=timeouts.connect,
        read_timeout=timeouts.read,
        retries={"total_max_attempts": timeouts.attempts, "mode": "standard"},
        max_pool_connections=pool_size,
        s3={"addressing_style": "path"},
    )
    with _SESSION_LOCK:  # a boto3 Session is not thread-safe; the clients it makes are
        return _session().client(
            "s3",
            region_name=location.region,
            endpoint_url=location.endpoint,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )


_SESSION_LOCK = threading.Lock()


# botocore's endpoint data names every AWS service: 6.5 MiB of Python objects kept for the process's life, of the
# 11 MiB its first S3 client loads. Clients here call S3, and STS for ambient credentials; a service left out
# resolves by its partition's defaults, as one newer than the data does.
ENDPOINT_SERVICES = frozenset({"s3", "sts"})


@functools.cache
def _session() -> boto3.session.Session:
    """One session for every client: its loaders' caches make a client's creation cheap after the first (and
    hold the endpoint data, kept to ``ENDPOINT_SERVICES``)."""
    core = botocore.session.Session()
    endpoints, _ = core.get_component("data_loader").load_data_with_path("endpoints")  # the copy the cache keeps
    for partition in endpoints["partitions"]:
        partition["services"] = {k: v for k, v in partition["services"].items() if k in ENDPOINT_SERVICES}
    return boto3.session.Session(botocore_session=core)


# --- the operator's clients: one per endpoint, region and credentials -----------------------------------------
# A boto3 client costs ~10 ms of CPU to make (and its own connection pool), so the operator keeps one per
# (endpoint, region, credentials) and shares it between its workers (boto3 clients are thread-safe). The
# credentials are in the key only as an HMAC under a key made at start-up: no secret is kept in a key, and a
# digest cannot be matched against a guessed secret outside this process. At most CLIENT_CACHE_SIZE clients
# (least recently used go first); a rotated key simply makes a new entry and the old one ages out.

CLIENT_CACHE_SIZE = 64
_DIGEST_KEY = secrets.token_bytes(32)
_clients: OrderedDict[tuple[str | None, str, str], S3Client] = OrderedDict()
_clients_lock = threading.Lock()


def credentials_digest(access_key_id: str | None, secret_access_key: str | None) -> str:
    """The identity of a key pair in this process (never the keys); ``ambient`` for none."""
    if access_key_id is None and secret_access_key is None:
        return "ambient"
    message = f"{access_key_id or ''}\0{secret_access_key or ''}".encode()
    return hmac.new(_DIGEST_KEY, message, hashlib.sha256).hexdigest()[:32]


def shared_client(
    location: S3Location,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    *,
    pool_size: int = 10,
) -> S3Client:
    """The operator's client for the location's endpoint and region with these keys (``OPERATOR_TIMEOUTS``)."""
    key = (location.endpoint, location.region, credentials_digest(access_key_id, secret_access_key))
    with _clients_lock:
        client = _clients.get(key)
        if client is not None:
            _clients.move_to_end(key)
            return client
    made = make_client(location, access_key_id, secret_access_key, timeouts=OPERATOR_TIMEOUTS, pool_size=pool_size)
    with _clients_lock:
        client = _clients.setdefault(key, made)  # another thread's, when it made one first
        _clients.move_to_end(key)
        while len(_clients) > CLIENT_CACHE_SIZE:
            _clients.popitem(last=False)
    return client


def _sse(location: S3Location) -> dict[str, Any]:
    if location.server_side_encryption == "None":
        return {}
    args: dict[str, Any] = {"ServerSideEncryption": location.server_side_encryption}
    if location.kms_key_id:
        args["SSEKMSKeyId"] = location.kms_key_id
    return args


@dataclass
class MultipartUpload:
    """A streaming upload: ``write`` fills one part while the previous one is sent (so the producer keeps going
    during the request), ``complete`` commits, ``abort`` discards. Memory: two part buffers, made once and reused
    (a part is sent from its buffer, never copied), so any upload holds at most ``2 * part_size``; with
    ``overlap=False`` one buffer, each part stored before the next is filled (half the memory, the producer
    waiting during each request).

    The SHA-256 and size of everything written are computed on the way.
    """

    client: S3Client
    location: S3Location
    key: str
    part_size: int = PART_SIZE
    overlap: bool = True
    size: int = 0
    _sha256: Any = field(default_factory=hashlib.sha256)
    _buffer: bytearray = field(default_factory=bytearray)  # the part being filled: its first ``_filled`` bytes
    _filled: int = 0
    _sent: bytearray = field(default_factory=bytearray)  # the buffer of the part last sent (free once stored)
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
        with memoryview(chunk) as data:
            start = 0
            while start < len(data):
                end = min(len(data), start + self.part_size - self._filled)
                # A buffer's first fill grows it; later fills overwrite it in place (same length: no allocation).
                self._buffer[self._filled : self._filled + end - start] = data[start:end]
                self._filled += end - start
                start = end
                if self._filled == self.part_size:
                    self._send()

    def _wait(self) -> None:
        if self._in_flight is not None:
            self._in_flight.result()
            self._in_flight = None

    def _send(self) -> None:
        """The filled buffer goes out as the next part; the previous part's buffer, once stored, is filled next."""
        self._wait()  # the previous part is stored (or its error raised) before its buffer is reused
        del self._buffer[self._filled :]  # only the last part is shorter than its buffer
        number = len(self._parts) + 1
        self._parts.append({"PartNumber": number})
        self._in_flight = self._sender.submit(self._upload_part, self._buffer, number)
        if self.overlap:
            self._buffer, self._sent = self._sent, self._buffer
        else:
            self._wait()  # stored: its buffer is filled again
        self._filled = 0

    def _upload_part(self, data: bytearray, number: int) -> None:
        response = self.client.upload_part(  # botocore takes a bytearray as it takes bytes (the stubs say bytes)
            Bucket=self.location.bucket,
            Key=self.key,
            UploadId=str(self._upload_id),
            PartNumber=number,
            Body=data,  # type: ignore[arg-type]
        )
        self._parts[number - 1]["ETag"] = response["ETag"]

    def _release(self) -> None:
        self._buffer, self._sent, self._filled = bytearray(), bytearray(), 0
        self._sender.shutdown()

    def complete(self) -> None:
        if self._filled or not self._parts:
            self._send()
        self._wait()
        self._release()
        self.client.complete_multipart_upload(
            Bucket=self.location.bucket,
            Key=self.key,
            UploadId=str(self._upload_id),
            MultipartUpload={"Parts": self._parts},  # type: ignore[typeddict-item]
        )

    def abort(self) -> None:
        if self._in_flight is not None:
            self._in_flight.exception()  # let the part in flight end; its error is the caller's to report
            self._in_flight = None
        self._release()
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


# --- the lifecycle rule ---------------------------------------------------------------------------------------
# A bucket has one lifecycle configuration, replaced whole by each PUT, and S3 has no conditional PUT for it
# (no ETag or version to compare): two writers that each read, add their rule and write lose one of the rules.
# So in this process one writer per bucket at a time (a lock stripe per endpoint and bucket), and after the
# PUT a read that verifies the rule, the whole repeated a bounded number of times when another writer (another
# process) replaced the configuration in between.

LIFECYCLE_ATTEMPTS = 3
_BUCKET_LOCKS = tuple(threading.Lock() for _ in range(32))


def abort_incomplete_uploads_rule(location: S3Location, days: int = 1) -> dict[str, Any]:
    """The lifecycle rule that aborts multipart uploads left open under the location's prefix (a run killed
    before it could abort)."""
    prefix = f"{location.prefix}/" if location.prefix else ""
    return {
        "ID": f"runbook-abort-incomplete-uploads:{prefix or '*'}"[:255],
        "Filter": {"Prefix": prefix},
        "Status": "Enabled",
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days},
    }


def lifecycle_rules(client: S3Client, bucket: str) -> list[dict[str, Any]]:
    try:
        rules: list[dict[str, Any]] = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]  # type: ignore[assignment]
    except client.exceptions.ClientError as error:
        if error.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
            raise
        return []
    return rules


def ensure_abort_incomplete_uploads(client: S3Client, location: S3Location, days: int = 1) -> bool:
    """The location's ``abort_incomplete_uploads_rule`` is in the bucket's lifecycle configuration; other rules
    are kept. Returns whether this call changed the configuration. Safe with any number of threads of this
    process; another writer's concurrent replacement is detected and repaired up to LIFECYCLE_ATTEMPTS times
    (after that a warning: the next check tries again)."""
    rule = abort_incomplete_uploads_rule(location, days)
    with _BUCKET_LOCKS[hash((location.endpoint, location.bucket)) % len(_BUCKET_LOCKS)]:
        changed = False
        rules = lifecycle_rules(client, location.bucket)
        for _ in range(LIFECYCLE_ATTEMPTS):
            if rule in rules:
                return changed
            if changed:  # the read after our PUT lacks the rule: another writer replaced the configuration
                LOG.warning("bucket %s: the lifecycle configuration was replaced concurrently", location.bucket)
                time.sleep(secrets.SystemRandom().uniform(0.2, 1.0))  # let it finish, then merge with what it wrote
                rules = lifecycle_rules(client, location.bucket)
            kept = [r for r in rules if r.get("ID") != rule["ID"]]
            client.put_bucket_lifecycle_configuration(
                Bucket=location.bucket,
                LifecycleConfiguration={"Rules": [*kept, rule]},  # type: ignore[list-item]
            )
            changed = True
            rules = lifecycle_rules(client, location.bucket)  # verify
        if rule in rules:
            return changed
    LOG.warning(
        "bucket %s: another writer keeps replacing the lifecycle configuration; the rule %s is missing",
        location.bucket,
        rule["ID"],
    )
    return changed
