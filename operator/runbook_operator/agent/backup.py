"""``runbook-operator backup``: one backup run, streamed ``source -> gpg -> S3 multipart``, manifest last.

Nothing of the backup touches the local disk and memory stays bounded: the source's stdout is copied into
gpg's stdin in small chunks, gpg's output reaches ``MultipartUpload.write`` through python-gnupg's
``on_data`` callback, and the upload holds at most one part. The upload is completed only when the source
and gpg both exited 0 (otherwise it is aborted), and ``manifest.json`` is written only after that: a
backup exists exactly when its manifest does. With the namespace's key in ``RUNBOOK_MANIFEST_KEY`` the
manifest carries ``signature``, an HMAC-SHA256 of its other fields (``models.plans.sign_manifest``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import botocore.exceptions
import yaml

from ..clients.gpg import CIPHER, GPG, GPGError
from ..clients.s3 import PART_SIZE, MultipartUpload, make_client, put_json
from ..errors import RunbookError, parse_spec
from ..logs import REDACTOR
from ..models.backup import KUBERNETES_RESOURCES, BackupPolicySpec, BackupSource, KubernetesSource
from ..models.plans import (
    DATA_OBJECTS,
    GPG_PASSPHRASE_ENV,
    GPG_RECIPIENTS_ENV,
    JOB_NAME_ENV,
    MANIFEST,
    MANIFEST_KEY_ENV,
    PG_CA_FILE_ENV,
    PG_PASSWORD_ENV,
    PG_USER_ENV,
    REDIS_CA_FILE_ENV,
    REDIS_CERT_FILE_ENV,
    REDIS_KEY_FILE_ENV,
    REDIS_PASSWORD_ENV,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
    SIGNATURE,
    SPEC_ENV,
    format_timestamp,
    object_key,
    sign_manifest,
)
from ..models.sources import GPGEncryption, PostgresConnection, RedisConnection

if TYPE_CHECKING:
    from ..clients.redis import TLSMaterial

LOG = logging.getLogger(__name__)
MANIFEST_FORMAT = 1
SECRET_ENVS = (PG_PASSWORD_ENV, REDIS_PASSWORD_ENV, S3_SECRET_KEY_ENV, GPG_PASSPHRASE_ENV, MANIFEST_KEY_ENV)
# Metadata that describes one live object, not its configuration; re-applying it elsewhere would fail or lie.
_STRIPPED_METADATA = ("uid", "resourceVersion", "managedFields", "creationTimestamp", "generation", "selfLink")
_STRIPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration", "deployment.kubernetes.io/revision")
_BGSAVE_TIMEOUT = 3600.0
ABORT_ATTEMPTS = 6  # about 30 s of retries
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def one_line(text: object, limit: int = 300) -> str:
    """The last non-empty line of a tool's message, redacted and shortened: safe for status and Events."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return REDACTOR.scrub(lines[-1] if lines else "no message")[:limit]


def require_env(env: Mapping[str, str], name: str, *, field: str) -> str:
    value = env.get(name)
    if not value:
        raise RunbookError("CredentialsMissing", f"{field}: environment variable {name} is not set")
    return value


@dataclass(frozen=True)
class AgentConfig:
    """One run: which policy (for keys and the manifest) and its spec."""

    namespace: str
    policy: str
    spec: BackupPolicySpec
    generation: int | None = None
    job: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, namespace: str, policy: str, generation: int | None) -> AgentConfig:
        raw = require_env(env, SPEC_ENV, field="spec")
        try:
            document = json.loads(raw)
        except json.JSONDecodeError as error:
            raise RunbookError("InvalidSpec", f"spec: {SPEC_ENV} is not JSON ({error.msg})") from None
        return cls(namespace, policy, parse_spec(BackupPolicySpec, document), generation, env.get(JOB_NAME_ENV))


@dataclass
class ProcessSource:
    """A dump tool whose stdout is the backup; the last lines of its stderr explain a failure."""

    tool: str
    args: list[str]
    env: Mapping[str, str]
    info: dict[str, Any] = field(default_factory=dict)
    after: Callable[[], None] | None = None  # once the tool exited 0, e.g. to add to ``info``
    _process: subprocess.Popen[bytes] | None = None
    _stderr: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    _drain: threading.Thread | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [self.tool, *self.args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(self.env)
        )
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for raw in self._process.stderr:
            self._stderr.append(raw.decode(errors="replace"))

    @property
    def stream(self) -> IO[bytes]:
        assert self._process is not None and self._process.stdout is not None
        return self._process.stdout

    def cancel(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    def finish(self) -> dict[str, Any]:
        """Wait for the tool; raise ``SourceFailed`` unless it exited 0."""
        assert self._process is not None
        code = self._process.wait()
        if self._drain is not None:
            self._drain.join(5)
        if code != 0:
            detail = one_line("".join(self._stderr)) if self._stderr else "no output"
            raise RunbookError("SourceFailed", f"{os.path.basename(self.tool)} exited with {code}: {detail}")
        if self.after is not None:
            self.after()
        return self.info

    def close(self) -> None:
        self.cancel()
        if self._process is not None:
            self._process.wait()
            for pipe in (self._process.stdout, self._process.stderr):
                if pipe is not None:
                    pipe.close()


class IteratorSource:
    """A generator of bytes read as a file (the Kubernetes export); an error in it fails the backup."""

    def __init__(self, chunks: Iterator[bytes], info: dict[str, Any]) -> None:
        self._chunks = chunks
        self._pending = b""
        self._error: RunbookError | None = None
        self._cancelled = False
        self.info = info

    @property
    def stream(self) -> IO[bytes]:
        return self  # type: ignore[return-value]  # python-gnupg only calls read()

    def read(self, size: int = -1) -> bytes:
        while not self._cancelled and self._error is None and (size < 0 or len(self._pending) < size):
            try:
                self._pending += next(self._chunks)
            except StopIteration:
                break
            except RunbookError as error:
                self._error = error
            except Exception as error:
                self._error = RunbookError("SourceFailed", f"kubernetes export: {one_line(error)}")
        if self._error is not None or self._cancelled:
            return b""
        cut = len(self._pending) if size < 0 else size
        chunk, self._pending = self._pending[:cut], self._pending[cut:]
        return chunk

    def cancel(self) -> None:
        self._cancelled = True

    def finish(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        return self.info

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]


Source = ProcessSource | IteratorSource


def _tool_version(tool: str) -> str:
    return subprocess.run([tool, "--version"], capture_output=True, text=True, check=False).stdout.strip()


def _sequence_record(value: Mapping[str, Any]) -> dict[str, Any]:
    return {"lastValue": value["lastValue"], "isCalled": value["isCalled"]}


def record_sequences_after_dump(recorded: dict[str, dict[str, Any]], now: Mapping[str, Mapping[str, Any]]) -> None:
    """Sequences are not transactional: pg_dump stores the value it read, at some moment between the snapshot
    and its exit. A sequence that moved meanwhile gets its value at the exit as ``afterDump``; the restore
    accepts any value between the two (in the sequence's direction)."""
    for key, before in recorded.items():
        after = now.get(key)
        if after is not None and _sequence_record(after) != before:
            before["afterDump"] = _sequence_record(after)


@contextlib.contextmanager
def postgres_source(conn: PostgresConnection, env: Mapping[str, str]) -> Iterator[Source]:
    """``pg_dump -Fc`` of an exported snapshot; in that same snapshot, exact per-table row counts and table
    OIDs, the large objects' count and digest, and the roles the database refers to (never a password);
    sequence values just before pg_dump starts and again after it exited."""
    import psycopg  # each source's client is imported only when used: the agent's memory stays small

    from ..clients import postgres

    field_ref = "spec.source.postgresql.credentialsSecretRef"
    user = require_env(env, PG_USER_ENV, field=field_ref)
    password = require_env(env, PG_PASSWORD_ENV, field=field_ref)
    target = {"PGHOST": conn.host, "PGPORT": str(conn.port), "PGDATABASE": conn.database, "PGCONNECT_TIMEOUT": "15"}
    child_env = {**env, **target}
    ca = postgres_ca(conn, env, field="spec.source.postgresql")
    try:
        database = postgres.connect(
            host=conn.host, port=conn.port, database=conn.database, user=user, password=password, ca=ca
        )
    except psycopg.OperationalError as error:
        problem = postgres.tls_problem(error)
        if problem is not None:
            raise RunbookError("TLSFailed", f"spec.source.postgresql.{problem}") from None
        raise RunbookError("SourceUnavailable", f"postgresql: {one_line(error)}") from None
    except psycopg.Error as error:
        raise RunbookError("SourceUnavailable", f"postgresql: {one_line(error)}") from None
    database.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    database.read_only = True
    with database, database.transaction():
        snapshot = database.execute("SELECT pg_export_snapshot()").fetchone()
        assert snapshot is not None
        try:
            counts = postgres.table_row_counts(database)
            oids = postgres.table_oids(database)
            large_objects = postgres.large_objects_digest(database)
            roles = postgres.referenced_roles(database)
            sequences = {k: _sequence_record(v) for k, v in postgres.sequence_values(database).items()}
        except psycopg.Error as error:
            raise RunbookError("SourceUnavailable", f"postgresql: {one_line(error)}") from None

        def sequences_now() -> dict[str, dict[str, Any]]:
            try:
                return postgres.sequence_values(database)
            except psycopg.Error as error:
                raise RunbookError("SourceUnavailable", f"postgresql: {one_line(error)}") from None

        source = ProcessSource(
            "pg_dump",
            ["--format=custom", f"--snapshot={snapshot[0]}", "--no-password"],
            child_env,
            info={
                "host": conn.host,
                "port": conn.port,
                "database": conn.database,
                "format": "custom",
                "serverVersion": database.info.parameter_status("server_version"),
                "tool": _tool_version("pg_dump"),
                "tableRowCounts": counts,
                "tableOids": oids,
                "sequences": sequences,
                "largeObjects": large_objects,
                "roles": roles,
            },
            after=lambda: record_sequences_after_dump(sequences, sequences_now()),
        )
        source.start()
        try:
            yield source  # the exporting transaction stays open until pg_dump is done
        finally:
            source.close()


def _read_mounted(env: Mapping[str, str], name: str, *, field: str) -> tuple[str, str]:
    """A file of a Secret volume, by the environment variable that names its path: (path, text)."""
    path = require_env(env, name, field=field)
    try:
        return path, Path(path).read_text()
    except OSError as error:
        raise RunbookError("CredentialsMissing", f"{field}: cannot read {path} ({error.strerror})") from None


def postgres_ca(conn: PostgresConnection, env: Mapping[str, str], *, field: str) -> str | None:
    """In an agent pod, the CA of ``conn.tls`` (``field``: the connection's path in the spec): the Secret volume
    file ``PG_CA_FILE_ENV`` names, as ``builders.backup.postgres_tls_files`` mounts it; None without TLS."""
    if conn.tls is None:
        return None
    return _read_mounted(env, PG_CA_FILE_ENV, field=f"{field}.tls.caSecretRef")[1]


def redis_tls(conn: RedisConnection, env: Mapping[str, str]) -> tuple[list[str], TLSMaterial | None]:
    """redis-cli's TLS arguments and the same files' contents for the agent's own client."""
    from ..clients.redis import TLSMaterial

    tls = conn.tls
    if tls is None or not tls.enabled:
        return [], None
    field = "spec.source.redis.tls"
    args = ["--tls"]
    ca = certificate = key = None
    if tls.insecure_skip_verify:
        args.append("--insecure")
    elif tls.ca_secret_ref is not None:
        ca_file, ca = _read_mounted(env, REDIS_CA_FILE_ENV, field=f"{field}.caSecretRef")
        args += ["--cacert", ca_file]
    if tls.client_certificate_secret_ref is not None:
        cert_file, certificate = _read_mounted(env, REDIS_CERT_FILE_ENV, field=f"{field}.clientCertificateSecretRef")
        key_file, key = _read_mounted(env, REDIS_KEY_FILE_ENV, field=f"{field}.clientCertificateSecretRef")
        args += ["--cert", cert_file, "--key", key_file]
    if tls.server_name is not None:
        args += ["--sni", tls.server_name]
    return args, TLSMaterial(ca=ca, certificate=certificate, key=key)


@contextlib.contextmanager
def redis_source(conn: RedisConnection, env: Mapping[str, str]) -> Iterator[Source]:
    """BGSAVE, wait for LASTSAVE to move, then the RDB over the network with ``redis-cli --rdb -``; every
    command under the name ``commands`` gives it (the runbook renames BGSAVE)."""
    import redis

    from ..clients import redis as redis_client

    field = "spec.source.redis"
    password = None
    if conn.password_secret_ref is not None:
        password = require_env(env, REDIS_PASSWORD_ENV, field=f"{field}.passwordSecretRef")
    tls_args, material = redis_tls(conn, env)
    server_name = (conn.tls.server_name if conn.tls is not None else None) or conn.host
    commands = conn.commands

    def call(name: str, *args: Any) -> Any:
        command: str = getattr(commands, name)
        try:
            return client.execute_command(command, *args)  # type: ignore[no-untyped-call]
        except redis.exceptions.NoPermissionError:
            user = conn.username or "default"
            message = f"{field}.username: the ACL user {user} may not run {command}"
            raise RunbookError("SourceUnavailable", message) from None
        except redis.ResponseError as error:
            if "unknown command" in str(error).lower():
                message = (
                    f"{field}.commands.{name}: the server does not know the command {command} "
                    "(renamed with rename-command? give its name here)"
                )
                raise RunbookError("SourceUnavailable", message) from None
            raise

    try:
        client = redis_client.connect(
            host=conn.host,
            port=conn.port,
            tls=conn.tls,
            material=material,
            user=conn.username or "default",
            password=password or "",
            commands=commands,
        )
    except redis_client.TLSFault as fault:
        raise RunbookError("SourceUnavailable", f"{field}.tls.{fault}") from None
    try:
        server = call("info", "server")
        previous = call("lastsave")
        if previous >= datetime.now(previous.tzinfo).replace(microsecond=0):
            time.sleep(1.0)  # LASTSAVE has second resolution: let a new save be distinguishable
        try:
            call("bgsave", "SCHEDULE")  # scheduled after an AOF rewrite in progress rather than refused
        except redis.ResponseError as error:
            if "in progress" not in str(error):  # "Background save already in progress" is fine
                raise
        deadline = time.monotonic() + _BGSAVE_TIMEOUT
        while call("lastsave") == previous:
            if call("info", "persistence").get("rdb_last_bgsave_status") == "err":
                raise RunbookError("SourceFailed", "redis: BGSAVE failed (see the server's log)")
            if time.monotonic() > deadline:
                raise RunbookError("SourceFailed", "redis: BGSAVE did not finish in time")
            time.sleep(0.1)
        keyspace = {db: int(stats["keys"]) for db, stats in call("info", "keyspace").items()}
    except redis.ConnectionError as error:
        cause = redis_client.tls_fault(error, conn.tls, server_name=server_name)
        if cause is not None:
            raise RunbookError("SourceUnavailable", f"{field}.tls.{cause}") from None
        raise RunbookError("SourceUnavailable", f"redis: {one_line(error)}") from None
    except redis.RedisError as error:
        raise RunbookError("SourceUnavailable", f"redis: {one_line(error)}") from None
    finally:
        client.close()
    user_args = ["--user", conn.username] if conn.username else []
    source = ProcessSource(
        "redis-cli",
        ["-h", conn.host, "-p", str(conn.port), *tls_args, *user_args, "--no-auth-warning", "--rdb", "-"],
        env,
        info={
            "host": conn.host,
            "port": conn.port,
            "serverVersion": server.get("redis_version"),
            "tool": _tool_version("redis-cli"),
            "keyspace": keyspace,
        },
    )
    source.start()
    try:
        yield source
    finally:
        source.close()


def clean_object(obj: dict[str, Any]) -> dict[str, Any] | None:
    """An object as it can be re-applied elsewhere, or None for objects that other objects re-create."""
    metadata = obj.get("metadata") or {}
    if any(ref.get("controller") for ref in metadata.get("ownerReferences") or []):
        return None  # a controller re-creates it from its owner
    if obj.get("kind") == "ConfigMap" and metadata.get("name") == "kube-root-ca.crt":
        return None  # published into every namespace by the control plane
    if obj.get("kind") == "Secret" and obj.get("type") == "kubernetes.io/service-account-token":
        return None
    cleaned = {key: value for key, value in obj.items() if key != "status"}
    meta = {k: v for k, v in metadata.items() if k not in (*_STRIPPED_METADATA, "namespace", "ownerReferences")}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in _STRIPPED_ANNOTATIONS}
    meta.pop("annotations", None)
    if annotations:
        meta["annotations"] = annotations
    cleaned["metadata"] = meta
    spec = cleaned.get("spec")
    if obj.get("kind") == "Service" and isinstance(spec, dict) and spec.get("clusterIP") != "None":
        cleaned["spec"] = {k: v for k, v in spec.items() if k not in ("clusterIP", "clusterIPs")}
    if obj.get("kind") == "PersistentVolumeClaim" and isinstance(spec, dict):
        cleaned["spec"] = {k: v for k, v in spec.items() if k != "volumeName"}
    return cleaned


def export_kubernetes(source: KubernetesSource, counts: Counter[str]) -> Iterator[bytes]:
    """Multi-document YAML, one section per namespace (objects carry no namespace, so ``kubectl apply -n``
    re-applies a section to any namespace); listed page by page so memory stays bounded."""
    from ..clients.kube import api_client

    client = api_client()
    for namespace in source.namespaces:
        yield f"# namespace: {namespace}\n".encode()
        for plural in source.exported:
            group, version, kind = KUBERNETES_RESOURCES[plural]
            base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
            token: str | None = None
            while True:
                query: list[tuple[str, Any]] = [("limit", 200)] + ([("continue", token)] if token else [])
                try:
                    page = client.call_api(
                        f"{base}/namespaces/{namespace}/{plural}",
                        "GET",
                        query_params=query,
                        response_types_map={200: "object"},
                        auth_settings=["BearerToken"],
                        _return_http_data_only=True,
                    )
                except Exception as error:
                    status = getattr(error, "status", None)
                    raise RunbookError(
                        "SourceFailed", f"kubernetes: list {plural} in {namespace}: HTTP {status or one_line(error)}"
                    ) from None
                for item in page.get("items") or []:
                    cleaned = clean_object({"apiVersion": f"{group}/{version}".lstrip("/"), "kind": kind, **item})
                    if cleaned is not None:
                        counts[plural] += 1
                        yield b"---\n" + yaml.safe_dump(cleaned, sort_keys=False).encode()
                token = (page.get("metadata") or {}).get("continue")
                if not token:
                    break


@contextlib.contextmanager
def kubernetes_source(source: KubernetesSource) -> Iterator[Source]:
    counts: Counter[str] = Counter()
    reader = IteratorSource(
        export_kubernetes(source, counts),
        info={"namespaces": source.namespaces, "resources": source.exported, "objectCounts": counts},
    )
    try:
        yield reader
    finally:
        reader.close()


def open_source(source: BackupSource, env: Mapping[str, str]) -> contextlib.AbstractContextManager[Source]:
    if source.postgresql is not None:
        return postgres_source(source.postgresql, env)
    if source.redis is not None:
        return redis_source(source.redis, env)
    assert source.kubernetes is not None
    return kubernetes_source(source.kubernetes)


@dataclass(frozen=True)
class EncryptionKeys:
    recipients: list[str] | None
    passphrase: str | None
    manifest: dict[str, Any]


def encryption_keys(gpg: GPG, settings: GPGEncryption, env: Mapping[str, str]) -> EncryptionKeys:
    """Import the recipients' public keys, or take the symmetric passphrase."""
    described: dict[str, Any] = {"tool": "gpg", "toolVersion": gpg.version, "cipher": CIPHER}
    if settings.recipients_config_map_ref is not None:
        field_ref = "spec.encryption.gpg.recipientsConfigMapRef"
        armored = require_env(env, GPG_RECIPIENTS_ENV, field=field_ref)
        # The pins come with the spec: a ConfigMap edited after the reconcile is refused here too.
        fingerprints = gpg.import_public_keys(armored, field=field_ref, fingerprints=settings.fingerprints)
        return EncryptionKeys(fingerprints, None, {**described, "mode": "publicKey", "recipients": fingerprints})
    passphrase = require_env(env, GPG_PASSPHRASE_ENV, field="spec.encryption.gpg.passphraseSecretRef")
    return EncryptionKeys(None, passphrase, {**described, "mode": "symmetric"})


def start_upload(config: AgentConfig, key: str, env: Mapping[str, str]) -> MultipartUpload:
    location = config.spec.destination.s3
    if location.credentials_secret_ref is not None:
        for name in (S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV):
            require_env(env, name, field="spec.destination.s3.credentialsSecretRef")
    client = make_client(location, env.get(S3_ACCESS_KEY_ENV), env.get(S3_SECRET_KEY_ENV))
    try:
        return MultipartUpload(client, location, key)
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            message = f"spec.destination.s3.bucket: bucket {location.bucket} does not exist"
            raise RunbookError("BucketNotFound", message) from None
        raise RunbookError("UploadFailed", f"S3: {code or one_line(error)}") from None
    except botocore.exceptions.BotoCoreError as error:
        raise RunbookError("UploadFailed", f"S3: {one_line(error)}") from None


def _as_runbook_error(error: BaseException) -> RunbookError:
    if isinstance(error, RunbookError):
        return error
    if isinstance(error, GPGError):
        return RunbookError("EncryptionFailed", one_line(error))
    if isinstance(error, botocore.exceptions.ClientError):
        return RunbookError("UploadFailed", f"S3: {error.response.get('Error', {}).get('Code', 'error')}")
    if isinstance(error, botocore.exceptions.BotoCoreError):
        return RunbookError("UploadFailed", f"S3: {one_line(error)}")
    return RunbookError("InternalError", f"{type(error).__name__}: {one_line(error)}")


def _abort(upload: MultipartUpload, error: RunbookError) -> RunbookError:
    """Abort the upload, retrying for a while when S3 is away (the failure may be S3 itself)."""
    for attempt in range(ABORT_ATTEMPTS):
        LOG.info("aborting the multipart upload of %s", upload.key)
        try:
            upload.abort()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            time.sleep(min(2**attempt, 5))
        else:
            return error
    return RunbookError(
        error.reason, f"{error.message} (the upload could not be aborted; the bucket's lifecycle rule removes it)"
    )


def run_backup(config: AgentConfig, env: Mapping[str, str]) -> dict[str, Any]:
    """One backup; returns its manifest. Raises ``RunbookError`` (and leaves no object behind) on failure."""
    for name in SECRET_ENVS:
        REDACTOR.register(env.get(name))
    spec = config.spec
    started = datetime.now(UTC)
    folder = object_key(spec.destination.s3, config.namespace, config.policy, format_timestamp(started))
    data_key = f"{folder}/{DATA_OBJECTS[spec.source.kind]}"
    with GPG() as gpg:
        keys = encryption_keys(gpg, spec.encryption.gpg, env)
        upload = start_upload(config, data_key, env)
        LOG.info("backing up %s to %s", spec.source.kind, data_key)
        try:
            with open_source(spec.source, env) as source:

                def sink(chunk: bytes) -> None:
                    try:
                        upload.write(chunk)
                    except BaseException:
                        source.cancel()  # stop reading the source: nothing more can be stored
                        raise

                gpg.encrypt_stream(source.stream, sink, recipients=keys.recipients, passphrase=keys.passphrase)
                source_info = source.finish()
            upload.complete()
        except BaseException as error:
            raise _abort(upload, _as_runbook_error(error)) from None
    ended = datetime.now(UTC)
    manifest = {
        "formatVersion": MANIFEST_FORMAT,
        "policy": {"namespace": config.namespace, "name": config.policy, "generation": config.generation},
        "job": config.job,
        "startTime": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "endTime": ended.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "durationSeconds": round((ended - started).total_seconds(), 3),
        "source": {"kind": spec.source.kind, **source_info},
        "data": {"key": data_key, "sizeBytes": upload.size, "sha256": upload.sha256, "partSizeBytes": PART_SIZE},
        "encryption": keys.manifest,
        "agent": {"version": package_version("runbook-operator")},
    }
    key = env.get(MANIFEST_KEY_ENV)
    if key:  # the namespace's signing key: restores and drills refuse a manifest it did not sign
        manifest[SIGNATURE] = sign_manifest(manifest, key)
    put_json(upload.client, spec.destination.s3, f"{folder}/{MANIFEST}", manifest)
    return manifest


def _fixed_mmap_threshold() -> None:
    """Parts are 8 MiB and change threads; glibc would raise its mmap threshold after the first is freed and
    then carve parts out of per-thread arenas, which fragments and lets RSS creep. A fixed threshold keeps
    every part in its own mapping, returned to the system when freed. (A no-op without glibc.)"""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)


def main(*, namespace: str, policy: str, generation: int | None, env: Mapping[str, str] | None = None) -> int:
    """The CLI entry: exit 0 with a one-line JSON summary, or non-zero with a one-line reason (no secrets)."""
    _fixed_mmap_threshold()
    environment = os.environ if env is None else env
    try:
        config = AgentConfig.from_env(environment, namespace=namespace, policy=policy, generation=generation)
        manifest = run_backup(config, environment)
    except RunbookError as error:
        print(f"backup failed: {error.reason}: {REDACTOR.scrub(error.message)}", file=sys.stderr, flush=True)
        return 1
    summary = {"key": manifest["data"]["key"], "sizeBytes": manifest["data"]["sizeBytes"]}
    print(json.dumps({"backup": "complete", **summary, "sha256": manifest["data"]["sha256"]}), flush=True)
    return 0
