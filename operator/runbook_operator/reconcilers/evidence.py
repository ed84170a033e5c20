"""Forensic evidence of an isolated namespace: collected, packed, gpg-encrypted, uploaded, then a custody
manifest written last (it commits the evidence). Nothing here ever deletes an uploaded object.

The capture streams: container logs are read in chunks, framed into a tar as they arrive, and the tar goes
through gpg into an S3 multipart upload, hashing every file and the tar on the way. Memory is bounded by a
few chunks and one 5 MiB part, not by the namespace's logs: a tar member's size precedes its bytes, so each log is
read whole before it is archived, but it waits compressed in memory, and logs read ahead of the one being
archived wait only while they hold less than ``READ_AHEAD``."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from kubernetes.client import ApiException

from ..builders.isolation import FileDigest, custody_manifest
from ..clients import kube, s3
from ..clients.gpg import GPG, GPGError
from ..conditions import now_rfc3339
from ..errors import RunbookError
from ..logs import REDACTOR
from ..models.isolation import EvidenceCapture, EvidenceRecord
from ..models.plans import object_key
from ..models.sources import Encryption, S3Location
from .catalog import s3_client

LOG_LIMIT_BYTES = 16 * 1024 * 1024  # per container log; evidence of a breach is rarely in the 17th MiB
LOG_TIMEOUT = 10.0  # seconds per log request: an unreachable kubelet must not hold up containment
LOG_WORKERS = 4  # each holds a 256 KiB zlib state while it reads
CHUNK = 64 * 1024
READ_AHEAD = 1024 * 1024  # compressed bytes of the logs read ahead of the one being archived
PART_SIZE = 5 * 1024 * 1024  # S3's smallest part: the upload holds one (``overlap=False``, below)
RETRY = 30.0
FIELD = "spec.evidence"
REPLICA_SETS = kube.Resource("apps", "v1", "replicasets", "ReplicaSet")
OBJECTS = {
    "pods.json": kube.PODS,
    "events.json": kube.EVENTS,
    "replicasets.json": REPLICA_SETS,
    "deployments.json": kube.DEPLOYMENTS,
    "statefulsets.json": kube.STATEFUL_SETS,
    "cronjobs.json": kube.CRON_JOBS,
    "networkpolicies.json": kube.NETWORK_POLICIES,
}
LOG_ERRORS = "log-errors.json"


def _as_json(objects: Any) -> bytes:
    return json.dumps(objects, indent=1, sort_keys=True).encode()


def _why(error: Exception) -> str:
    if isinstance(error, ApiException):
        return REDACTOR.scrub(f"HTTP {error.status}: {kube.server_message(error)}")[:512]
    return REDACTOR.scrub(f"{type(error).__name__}: {error}")[:512]


# --- the tar, framed by hand so that it can be written as its files arrive -----------------------------------
def tar_member(name: str, size: int, chunks: Iterable[bytes], *, mtime: int) -> Iterator[bytes]:
    """One file of the archive (fixed owner and mode, PAX headers): its header, its bytes, the padding."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o444
    yield info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    written = 0
    for chunk in chunks:
        written += len(chunk)
        yield chunk
    if written != size:  # a header promising other than what follows would corrupt every later file
        raise RuntimeError(f"tar member {name}: {written} bytes written, {size} announced")
    yield bytes(-size % tarfile.BLOCKSIZE)


def tar_end(offset: int) -> bytes:
    """The end-of-archive blocks and the record padding, after ``offset`` bytes of members (as tarfile)."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return bytes(2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE)


# --- container logs, read in parallel, archived in order ----------------------------------------------------
class _Abandoned(RuntimeError):
    """The archive stopped (the upload or gpg failed): logs still being read are dropped."""


class _Window:
    """Bounds what readers hold ahead of the archive: the reader of a later log waits while more than
    ``limit`` bytes are held; the reader of the log the archive waits for never does, so it always progresses."""

    def __init__(self, limit: int) -> None:
        self._limit, self._held, self._next, self._closed = limit, 0, 0, False
        self._changed = threading.Condition()

    def hold(self, index: int, size: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._closed or index == self._next or self._held + size <= self._limit)
            if self._closed:
                raise _Abandoned("evidence archive abandoned")
            self._held += size

    def archived(self, size: int) -> None:
        """The next log is in the archive: its ``size`` held bytes are free."""
        with self._changed:
            self._held -= size
            self._next += 1
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


@dataclass
class _Log:
    """One container log as read: compressed in memory until archived, with its size and SHA-256 (or why it
    could not be read)."""

    name: str
    size: int = 0
    held: int = 0
    pieces: deque[bytes] = field(default_factory=deque)
    sha256: Any = field(default_factory=hashlib.sha256)
    error: str | None = None

    def keep(self, piece: bytes, window: _Window, index: int) -> None:
        if piece:
            window.hold(index, len(piece))
            self.held += len(piece)
            self.pieces.append(piece)

    def chunks(self) -> Iterator[bytes]:
        """The log's bytes again, a chunk at a time (each compressed piece dropped once inflated)."""
        inflate = zlib.decompressobj()
        while self.pieces:
            pending = self.pieces.popleft()
            while pending:
                yield inflate.decompress(pending, CHUNK)
                pending = inflate.unconsumed_tail
        yield inflate.flush()


def _log_name(pod: str, container: str, previous: bool) -> str:
    return f"logs/{pod}/{container}{'.previous' if previous else ''}.log"


def _read_log(api: kube.Api, namespace: str, request: tuple[str, str, bool], index: int, window: _Window) -> _Log:
    pod, container, previous = request
    log = _Log(_log_name(*request))
    deflate = zlib.compressobj(1)
    try:
        window.hold(index, 0)  # no request once the archive is abandoned
        chunks = api.stream_log(
            namespace,
            pod,
            container=container,
            limit_bytes=LOG_LIMIT_BYTES,
            previous=previous,
            timestamps=True,
            timeout=LOG_TIMEOUT,
        )
        for chunk in chunks:
            log.sha256.update(chunk)
            log.size += len(chunk)
            log.keep(deflate.compress(chunk), window, index)
        log.keep(deflate.flush(), window, index)
    except Exception as error:  # recorded per log: one unreadable log must not lose the others
        log.pieces.clear()
        log.error = _why(error)
    return log


class _Logs:
    """Every container's current and previous log, in name order, each read whole before it is yielded and
    the next ones read meanwhile (at most ``READ_AHEAD`` held). ``close`` (from any thread) drops the rest."""

    def __init__(self, api: kube.Api, namespace: str, pods: list[dict[str, Any]]) -> None:
        self._api, self._namespace, self._window = api, namespace, _Window(READ_AHEAD)
        self._requests = sorted(
            (
                (str(pod["metadata"]["name"]), str(container["name"]), previous)
                for pod in pods
                for container in [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"]]
                for previous in (False, True)
            ),
            key=lambda request: _log_name(*request),
        )

    def __iter__(self) -> Iterator[_Log]:
        pool = ThreadPoolExecutor(LOG_WORKERS, thread_name_prefix="evidence-log")
        try:
            # Readers start in order, so the log the archive waits for is always being read, never queued.
            futures = [
                pool.submit(_read_log, self._api, self._namespace, request, index, self._window)
                for index, request in enumerate(self._requests)
            ]
            for future in futures:
                log = future.result()
                yield log
                self._window.archived(log.held)
        finally:
            self.close()
            pool.shutdown(wait=False, cancel_futures=True)  # a reader still running ends at its next chunk

    def close(self) -> None:
        self._window.close()


@dataclass
class Archive:
    """The evidence tar as a stream of chunks: the namespace's objects (read beforehand), its logs as they are
    read, then ``log-errors.json``. Each file's digest, the logs' errors and the tar's SHA-256 are known once
    the stream ends."""

    objects: dict[str, bytes]
    logs: _Logs
    mtime: int
    on_collected: Callable[[], None] = lambda: None
    files: list[FileDigest] = field(default_factory=list)
    log_errors: dict[str, str] = field(default_factory=dict)
    collected: str = ""
    closed: bool = False
    _sha256: Any = field(default_factory=hashlib.sha256)

    @property
    def sha256(self) -> str:
        return str(self._sha256.hexdigest())

    def close(self) -> None:
        """Stop (the upload or gpg failed): the stream ends at its next chunk, logs being read are dropped."""
        self.closed = True
        self.logs.close()

    def chunks(self) -> Iterator[bytes]:
        offset = 0
        for chunk in self._members():
            self._sha256.update(chunk)
            offset += len(chunk)
            yield chunk
        end = tar_end(offset)
        self._sha256.update(end)
        yield end

    def _members(self) -> Iterator[bytes]:
        for name, data in sorted(self.objects.items()):
            yield from self._file(name, len(data), [data], hashlib.sha256(data))
        for log in self.logs:
            if log.error is not None:
                self.log_errors[log.name] = log.error
            else:
                yield from self._file(log.name, log.size, log.chunks(), log.sha256)
        self.collected = now_rfc3339()
        self.on_collected()
        errors = json.dumps(self.log_errors, indent=1, sort_keys=True).encode()
        yield from self._file(LOG_ERRORS, len(errors), [errors], hashlib.sha256(errors))
        self.files.sort(key=lambda f: f.name)

    def _file(self, name: str, size: int, chunks: Iterable[bytes], sha256: Any) -> Iterator[bytes]:
        yield from tar_member(name, size, (c for c in chunks if c), mtime=self.mtime)
        self.files.append(FileDigest(name, size, sha256.hexdigest()))


def collect(api: kube.Api, namespace: str, *, on_collected: Callable[[], None] = lambda: None) -> Archive:
    """Pod specs, Events, ReplicaSets, workloads and NetworkPolicies (read now), and every container's current
    and previous log (read as the archive is consumed; why a log could not be read goes to log-errors.json)."""
    listed = {name: api.list(resource, namespace) for name, resource in OBJECTS.items()}
    return Archive(
        objects={name: _as_json(objects) for name, objects in listed.items()},
        logs=_Logs(api, namespace, listed["pods.json"]),
        mtime=int(datetime.now(UTC).timestamp()),
        on_collected=on_collected,
    )


class _Source(io.RawIOBase):
    """gpg's input: a readable file over the archive's chunks, ending early once the archive is closed."""

    def __init__(self, archive: Archive) -> None:
        super().__init__()
        self._archive, self._chunks, self._rest = archive, archive.chunks(), memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._rest:
            chunk = None if self._archive.closed else next(self._chunks, None)
            if chunk is None:
                return 0
            self._rest = memoryview(chunk)
        size = min(len(buffer), len(self._rest))
        buffer[:size] = self._rest[:size]
        self._rest = self._rest[size:]
        return size


def s3_error(location: S3Location, error: Exception) -> RunbookError:
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404"):
            return RunbookError(
                "BucketNotFound", f"{FIELD}.destination.bucket: bucket {location.bucket} not found", retry_after=RETRY
            )
        return RunbookError(
            "EvidenceStoreError", f"{FIELD}.destination: bucket {location.bucket}: {code}", retry_after=RETRY
        )
    return RunbookError("EvidenceStoreUnreachable", f"{FIELD}.destination: {type(error).__name__}", retry_after=RETRY)


def _encryptor(
    api: kube.Api, namespace: str, encryption: Encryption, gpg: GPG
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments for ``encrypt_stream`` and how the manifest describes the encryption."""
    settings = encryption.gpg
    if settings.recipients_config_map_ref is not None:
        armored = kube.config_map_value(
            api,
            namespace,
            settings.recipients_config_map_ref.name,
            settings.recipients_config_map_ref.key,
            field=f"{FIELD}.encryption.gpg.recipientsConfigMapRef",
        )
        fingerprints = gpg.import_public_keys(
            armored, field=f"{FIELD}.encryption.gpg.recipientsConfigMapRef", fingerprints=settings.fingerprints
        )
        return {"recipients": fingerprints}, {"method": "public-key", "recipients": fingerprints}
    assert settings.passphrase_secret_ref is not None  # the model guarantees exactly one
    ref = settings.passphrase_secret_ref
    passphrase = kube.secret_value(
        api, namespace, ref.name, ref.key, field=f"{FIELD}.encryption.gpg.passphraseSecretRef"
    )
    return {"passphrase": passphrase}, {"method": "symmetric", "cipher": "AES256"}


def capture(
    api: kube.Api,
    body: Mapping[str, Any],
    settings: EvidenceCapture,
    *,
    requester: str,
    on_collected: Callable[[], None],
) -> EvidenceRecord:
    """Collect, pack, encrypt and upload the namespace's evidence; write the custody manifest last.

    Everything that can fail on configuration (Secrets, keys, bucket) is checked before collecting.
    ``on_collected`` runs once the last log is read (the archive is encrypted and uploaded as it is read).
    """
    location, encryption = settings.destination, settings.encryption
    if location is None or encryption is None:
        missing = "destination" if location is None else "encryption"
        raise RunbookError("EvidenceNotConfigured", f"{FIELD}.{missing}: required when evidence.capture is true")
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    started = now_rfc3339()
    with GPG() as gpg:
        encrypt_args, encryption_record = _encryptor(api, namespace, encryption, gpg)
        client = s3_client(api, namespace, location, field=f"{FIELD}.destination.credentialsSecretRef")
        try:
            client.head_bucket(Bucket=location.bucket)
        except (ClientError, BotoCoreError) as error:
            raise s3_error(location, error) from None
        stamp = started.replace("-", "").replace(":", "")
        folder = object_key(location, namespace, body["spec"]["incidentId"], f"{name}-{stamp}")
        key = f"{folder}/evidence.tar.gpg"
        archive = collect(api, namespace, on_collected=on_collected)
        try:
            # One part buffer, each part stored before the next fills: the reading of the logs, not the upload,
            # bounds a capture's time (300 MiB of logs in the same time as with two), and 5 MiB fewer are held.
            upload = s3.MultipartUpload(client, location, key, part_size=PART_SIZE, overlap=False)

            def send(chunk: bytes) -> None:
                try:
                    upload.write(chunk)
                except BaseException:
                    archive.close()  # a refused part: read no more logs; gpg reports the error once it ends
                    raise

            try:
                gpg.encrypt_stream(io.BufferedReader(_Source(archive), CHUNK), send, **encrypt_args)
                upload.complete()
            except BaseException:
                archive.close()
                upload.abort()
                raise
            manifest = custody_manifest(
                body=body,
                requester=requester,
                archive_key=key,
                archive_sha256=upload.sha256,
                archive_size=upload.size,
                tar_sha256=archive.sha256,
                files=archive.files,
                encryption={**encryption_record, "gpgVersion": gpg.version},
                times={
                    "requested": body["metadata"].get("creationTimestamp", ""),
                    "collectionStarted": started,
                    "collected": archive.collected,
                    "uploaded": now_rfc3339(),
                },
                log_errors=archive.log_errors,
            )
            manifest_key = f"{folder}/custody.json"
            s3.put_json(client, location, manifest_key, manifest)
        except (ClientError, BotoCoreError) as error:
            raise s3_error(location, error) from None
        except GPGError as error:
            raise RunbookError("EncryptionFailed", f"{FIELD}.encryption: {error}", retry_after=RETRY) from None
    return EvidenceRecord(
        key=key, sha256=upload.sha256, manifest_key=manifest_key, files=len(archive.files), captured_at=now_rfc3339()
    )
