"""``runbook-operator verify`` and ``restore``: a backup streamed ``S3 -> gpg -> pg_restore``, no plaintext on disk.

``verify`` (the restore's preflight, run in its own Job so that no byte of a backup passes through the
operator; ``--source`` redis and kubernetes read those backups as their modules say) reads the whole stored
object: its size and SHA-256 are computed while
streaming and must match the manifest, gpg must decrypt it completely, and ``pg_restore --list`` must read
its table of contents and find the data of every table the manifest recorded (by the table's OID: names are
printed unquoted and may hold spaces). It writes nothing anywhere.

``restore`` streams the same way into ``pg_restore --clean --if-exists --single-transaction --exit-on-error
--file -`` (with ``--no-owner``/``--no-privileges`` as ``spec.roles`` says), after creating the backed-up
roles the server lacks when asked to. pg_restore has no connection of its own: it writes the restore as SQL
into ``psql`` (``ON_ERROR_STOP``), inside a transaction the agent opened with ``BEGIN`` before the first
byte. The script's closing ``COMMIT`` is held back and released only once the whole stored object was read
and its size and SHA-256 matched the digest pinned in the plan, gpg decrypted it completely and pg_restore
exited 0; otherwise psql's input ends without it and the server rolls the transaction back. An object
swapped after the preflight, a failure halfway: the database is either restored completely or left as it
was.

With ``RUNBOOK_MANIFEST_KEY`` set, every run first checks the plan's manifest: its HMAC signature must verify
with that key and it must name the object, digest and size the plan reads (``ManifestUnsigned`` /
``ManifestForged`` otherwise), before anything is read or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, Protocol, TypeVar

import botocore.exceptions
import psycopg

from ..clients import postgres
from ..clients.gpg import GPG, GPGError
from ..clients.s3 import make_client
from ..errors import RunbookError, parse_spec
from ..logs import REDACTOR
from ..models.common import CamelModel
from ..models.plans import (
    GPG_PASSPHRASE_ENV,
    GPG_PRIVATE_KEY_ENV,
    MANIFEST_KEY_ENV,
    MANIFEST_KEY_SECRET,
    PG_PASSWORD_ENV,
    PG_USER_ENV,
    RESTORE_PLAN_ENV,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
    KubernetesRestorePlan,
    RedisRestorePlan,
    RestorePlan,
    StoredObjectPlan,
    manifest_signed,
)
from ..models.sources import PostgresConnection
from .backup import one_line, postgres_ca, require_env

PlanModel = TypeVar("PlanModel", bound=CamelModel)

SECRET_ENVS = (PG_PASSWORD_ENV, S3_SECRET_KEY_ENV, GPG_PASSPHRASE_ENV, GPG_PRIVATE_KEY_ENV, MANIFEST_KEY_ENV)
_READ_SIZE = 64 * 1024
# pg_restore's script, held back at its end until the object matched: the closing COMMIT is in its last bytes.
_SCRIPT_TAIL = 4096
_COMMIT = b"COMMIT;\n"
# pg_restore's scripts (13.22, 14.19, 15.14, 16.10, 17.6 and later) begin by putting psql in restricted mode,
# where it refuses the meta-commands (\! and the like) a crafted archive could carry.
_RESTRICT = b"\n\\restrict "
_TARGET_FIELD = "spec.target.credentialsSecretRef"
# A pg_restore --list entry: "<dump id>; <catalog oid> <object oid> <type> <schema> <name> <owner>", where the
# type may hold spaces (TABLE DATA) and schema, name and owner are printed unquoted.
_TOC_ENTRY = re.compile(r"(\d+); (\d+) (\d+) (.*)")
_TABLE_DATA = "TABLE DATA "
_MISSING_ROLE = re.compile(r'role ".*" does not exist')


class Sink(Protocol):
    """Where the plaintext goes: a tool's stdin (ToolSink) or a parser in this process."""

    def write(self, chunk: bytes) -> None: ...
    def finish(self) -> int: ...
    def kill(self) -> None: ...


class ChecksummedReader:
    """The stored object as a file: size and SHA-256 computed on the way; ``matches`` once all was read."""

    def __init__(self, body: Any, *, sha256: str, size: int) -> None:
        self._body = body
        self._expected = (sha256, size)
        self._digest = hashlib.sha256()
        self._eof = False
        self.size = 0

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    @property
    def matches(self) -> bool:
        """Whether everything was read and it is the expected object."""
        return self._eof and (self.sha256, self.size) == self._expected

    def read(self, size: int = -1) -> bytes:
        if self._eof:
            return b""
        chunk: bytes = self._body.read(_READ_SIZE if size is None or size < 0 else size)
        if not chunk:
            self._eof = True
        self._digest.update(chunk)
        self.size += len(chunk)
        return chunk

    def drain(self) -> None:
        """Read (and digest) the rest, e.g. after gpg stopped early, so ``matches`` is known."""
        while self.read(_READ_SIZE):
            pass

    def close(self) -> None:
        self._body.close()


class ToolSink:
    """A tool reading the plaintext on its stdin. Once it exited, further chunks are dropped (``pg_restore
    --list`` stops after the table of contents); each stdout line goes to ``on_line``, or the raw output,
    chunk by chunk, to ``on_output``."""

    def __init__(
        self,
        args: list[str],
        env: Mapping[str, str],
        on_line: Callable[[str], None] | None = None,
        *,
        on_output: Callable[[bytes], None] | None = None,
    ) -> None:
        self.tool = args[0]
        self._process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env)
        )
        self._stderr: deque[str] = deque(maxlen=20)
        self._on_line = on_line or (lambda _line: None)
        self._closed = False
        self._readers = [
            threading.Thread(target=self._read, args=(self._process.stderr, self._stderr.append), daemon=True)
        ]
        if on_output is None:
            self._readers.append(
                threading.Thread(target=self._read, args=(self._process.stdout, self._on_line), daemon=True)
            )
            self._output: threading.Thread | None = None
        else:
            self._output = threading.Thread(target=self._copy, args=(self._process.stdout, on_output), daemon=True)
            self._output.start()
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe: IO[bytes] | None, consume: Callable[[str], None]) -> None:
        assert pipe is not None
        for raw in pipe:
            consume(raw.decode(errors="replace").rstrip("\n"))

    @staticmethod
    def _copy(pipe: IO[bytes] | None, consume: Callable[[bytes], None]) -> None:
        assert pipe is not None
        while chunk := pipe.read1(_READ_SIZE):  # type: ignore[attr-defined]
            consume(chunk)

    def write(self, chunk: bytes) -> None:
        if self._closed:
            return
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(chunk)
        except (BrokenPipeError, ValueError):
            self._closed = True

    def send(self, text: bytes) -> None:
        """Write and flush at once."""
        self.write(text)
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self._process.stdin.flush()

    def finish(self) -> int:
        """Close stdin and wait for the tool's exit code (and for all of its raw output to be consumed)."""
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        code = self._process.wait()
        for reader in self._readers:
            reader.join(5)
        if self._output is not None:
            self._output.join()
        return code

    @property
    def error(self) -> str:
        """The tool's last error line (pg_restore follows it with DETAIL, HINT and the failed command)."""
        errors = [line for line in self._stderr if "error:" in line.lower()]
        return one_line("\n".join(errors or list(self._stderr)) or "no output")

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self.finish()


class TransactionSink:
    """The restore's sink: ``pg_restore --single-transaction --file -`` (no connection of its own) turns the
    archive into SQL, which goes on into psql, after a ``BEGIN`` the agent sent first. The script's own
    closing ``COMMIT`` (always its last statement, followed only by comments and ``\\unrestrict``) is held
    back with the script's last bytes; ``commit()`` releases it and is the only way anything is committed.
    ``close()`` without it ends psql's input inside the transaction, so the server rolls it back. A script
    that does not begin with ``\\restrict`` (an older pg_restore) is not given to psql at all."""

    def __init__(self, restore_args: list[str], env: Mapping[str, str]) -> None:
        psql = ["psql", "--no-psqlrc", "--quiet", "--no-password", "--set", "ON_ERROR_STOP=1"]
        self.psql = ToolSink(psql, env)
        self.psql.send(b"BEGIN;\n")
        self._held = bytearray()
        self._tail: bytes | None = None
        self.refusal: str | None = None
        self._head_checked = False
        self.pg_restore = ToolSink(["pg_restore", *restore_args, "--file", "-"], env, on_output=self._forward)

    def _restricted(self) -> bool:
        """Checked once, on the script's first bytes: whether it puts psql in restricted mode."""
        if not self._head_checked:
            self._head_checked = True
            if _RESTRICT not in self._held[:_SCRIPT_TAIL]:
                self.refusal = (
                    "pg_restore's script does not put psql in restricted mode (\\restrict): the agent's "
                    "postgresql-client is older than 15.14 (or 13.22, 14.19, 16.10, 17.6); nothing was run"
                )
        return self.refusal is None

    def _forward(self, chunk: bytes) -> None:
        self._held += chunk
        cut = len(self._held) - _SCRIPT_TAIL
        if cut > 0 and self._restricted():
            self.psql.write(bytes(self._held[:cut]))
        if cut > 0:
            del self._held[:cut]

    def write(self, chunk: bytes) -> None:
        self.pg_restore.write(chunk)

    def finish(self) -> int:
        """pg_restore's exit code once all of its script but the closing COMMIT went to psql."""
        code = self.pg_restore.finish()
        at = self._held.rfind(b"\n" + _COMMIT) + 1
        if code == 0 and at > 0 and self._restricted():
            self.psql.write(bytes(self._held[:at]))
            self._tail = bytes(self._held[at:])
        self._held.clear()
        return code

    def kill(self) -> None:
        self.pg_restore.kill()
        self.psql.kill()

    def commit(self) -> int:
        """Release the script's COMMIT (only once the object's digest matched); psql's exit code."""
        if self._tail is None:
            reason = self.refusal or "pg_restore's script did not end in its COMMIT: nothing was committed"
            self.close()
            raise RunbookError("RestoreFailed", reason)
        self.psql.send(self._tail)
        return self.close()

    def close(self) -> int:
        """End psql's input (a transaction not committed by now is rolled back); psql's exit code."""
        return self.psql.finish()


def require_signed(plan: StoredObjectPlan, env: Mapping[str, str]) -> None:
    """With the namespace's manifest key, the plan's manifest must carry a signature made with it and name
    exactly the object, digest and size the plan reads; checked before anything is read or written."""
    key = env.get(MANIFEST_KEY_ENV)
    if not key:
        return
    manifest = plan.manifest
    where = f"{MANIFEST_KEY_ENV} (Secret {MANIFEST_KEY_SECRET})"
    if manifest is None or not manifest.get("signature"):
        raise RunbookError("ManifestUnsigned", f"{plan.key}: the backup's manifest is not signed; {where} requires it")
    data = manifest.get("data") or {}
    if not manifest_signed(manifest, key) or (data.get("key"), data.get("sha256"), data.get("sizeBytes")) != (
        plan.key,
        plan.sha256,
        plan.size_bytes,
    ):
        raise RunbookError(
            "ManifestForged",
            f"{plan.key}: the manifest's signature does not verify with {where}: not written by this namespace's "
            "backups, or changed since",
        )


@dataclass(frozen=True)
class Streamed:
    """A stream that checked out: the tool's exit code and the ETag of the object read (a preflight pins it)."""

    code: int
    etag: str


def open_object(
    plan: StoredObjectPlan, env: Mapping[str, str], *, client: Any = None, field: str = "spec.backup"
) -> tuple[Any, str]:
    """The body of the stored object, streaming, and its ETag; with the plan's ``etag``, only that object.
    ``client``: one the caller reuses (else one is made from the pod's keys); ``field``: named when it is missing."""
    if client is None:
        client = make_client(plan.location, env.get(S3_ACCESS_KEY_ENV), env.get(S3_SECRET_KEY_ENV))
    try:
        if plan.etag:
            response = client.get_object(Bucket=plan.location.bucket, Key=plan.key, IfMatch=plan.etag)
        else:
            response = client.get_object(Bucket=plan.location.bucket, Key=plan.key)
        return response["Body"], str(response.get("ETag") or "")
    except botocore.exceptions.ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", "Error"))
        if code in ("NoSuchKey", "404"):
            raise RunbookError("BackupNotFound", f"{field}: the data object {plan.key} is missing") from None
        if code in ("PreconditionFailed", "412"):
            raise RunbookError(
                "ChecksumMismatch",
                f"{plan.key}: the stored object was changed since the preflight (its ETag is no longer {plan.etag})",
            ) from None
        raise RunbookError("DownloadFailed", f"S3: {code}") from None
    except botocore.exceptions.BotoCoreError as error:
        raise RunbookError("DownloadFailed", f"S3: {one_line(error)}") from None


@contextlib.contextmanager
def checked_object(
    plan: StoredObjectPlan, env: Mapping[str, str], *, client: Any = None, field: str = "spec.backup"
) -> Iterator[tuple[ChecksummedReader, str]]:
    """The stored object as a ``ChecksummedReader`` (and its ETag) for the ``with`` body to read. Leaving the body
    normally, the rest is read and ``ChecksumMismatch`` raised unless the object's size and SHA-256 are the
    plan's (an S3 failure while reading: ``DownloadFailed``); an exception from the body goes on as it is."""
    body, etag = open_object(plan, env, client=client, field=field)
    reader = ChecksummedReader(body, sha256=plan.sha256, size=plan.size_bytes)
    try:
        yield reader, etag
        reader.drain()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise RunbookError("DownloadFailed", f"S3: reading {plan.key}: {one_line(error)}") from None
    finally:
        reader.close()
    if not reader.matches:
        raise RunbookError(
            "ChecksumMismatch",
            f"{plan.key}: SHA-256 {reader.sha256[:16]}… over {reader.size} bytes does not match the manifest's "
            f"{plan.sha256[:16]}… over {plan.size_bytes} bytes: the stored object was changed",
        )


def decryption_key(gpg: GPG, plan: StoredObjectPlan, env: Mapping[str, str]) -> str | None:
    """Import the private key (public-key backups), or return the passphrase (symmetric backups)."""
    if plan.symmetric:
        return require_env(env, GPG_PASSPHRASE_ENV, field="spec.encryption.gpg.passphraseSecretRef")
    armored = require_env(env, GPG_PRIVATE_KEY_ENV, field="spec.decryptionSecretRef")
    if not gpg.import_secret_key(armored):
        raise RunbookError("InvalidDecryptionKey", "spec.decryptionSecretRef: no private key in the given data")
    return None


def stream(plan: StoredObjectPlan, env: Mapping[str, str], sink: Sink) -> Streamed:
    """Object -> gpg -> the tool; the tool's exit code once size, digest and decryption all checked out."""
    REDACTOR.register(env.get(GPG_PRIVATE_KEY_ENV))
    with GPG() as gpg:
        decrypt_error: GPGError | None = None
        finished = False
        try:
            require_signed(plan, env)
            passphrase = decryption_key(gpg, plan, env)
            # on leaving: the rest read and the digest checked, so a changed object is ChecksumMismatch first
            with checked_object(plan, env) as (reader, etag):
                try:
                    gpg.decrypt_stream(reader, sink.write, passphrase=passphrase)  # type: ignore[arg-type]
                except GPGError as error:
                    decrypt_error = error
                except BrokenPipeError:  # gpg exited before the object's end (e.g. bytes after its message)
                    decrypt_error = GPGError("gpg decrypt failed: it stopped reading before the end of the object")
                finally:
                    finished = True
                    code = sink.finish()
        except BaseException:
            if not finished:
                sink.kill()
            raise
    if decrypt_error is not None:
        key = "the passphrase" if plan.symmetric else "the private key in spec.decryptionSecretRef"
        raise RunbookError("DecryptionFailed", f"{one_line(decrypt_error)} with {key}")
    return Streamed(code, etag)


def missing_table_data(plan: RestorePlan, data_entries: Mapping[int, str]) -> list[str]:
    """The manifest's tables without a TABLE DATA entry, given those entries as ``{oid: "<schema> <name>
    <owner>"}``. A table is found by its OID; a manifest without OIDs (older agents) by its name, which
    the entry prints unquoted: ``"<schema> <name> "`` must begin the entry's text."""
    missing = []
    for key in plan.tables:
        oid = plan.table_oids.get(key)
        if oid is not None:
            found = oid in data_entries
        else:
            schema, name = postgres.parse_qualified_name(key)
            found = any(f"{text} ".startswith(f"{schema} {name} ") for text in data_entries.values())
        if not found:
            missing.append(key)
    return sorted(missing)


def verify(plan: RestorePlan, env: Mapping[str, str]) -> dict[str, Any]:
    """The preflight: checksum, decryption and ``pg_restore --list``; returns the figures."""
    entries = 0
    data_entries: dict[int, str] = {}

    def listed(line: str) -> None:
        nonlocal entries
        if line and not line.startswith(";"):
            entries += 1
            entry = _TOC_ENTRY.fullmatch(line)
            if entry is not None and entry.group(4).startswith(_TABLE_DATA):
                data_entries[int(entry.group(3))] = entry.group(4).removeprefix(_TABLE_DATA)

    sink = ToolSink(["pg_restore", "--list"], env, listed)
    streamed = stream(plan, env, sink)
    if streamed.code != 0 or not entries:
        raise RunbookError("ArchiveUnreadable", f"pg_restore --list cannot read {plan.key}: {sink.error}")
    missing = missing_table_data(plan, data_entries)
    if missing:
        raise RunbookError("ArchiveIncomplete", f"{plan.key} has no data for {', '.join(missing)[:300]}")
    return {"sha256": plan.sha256, "sizeBytes": plan.size_bytes, "etag": streamed.etag, "archiveEntries": entries}


def _target_login(env: Mapping[str, str]) -> tuple[str, str]:
    return require_env(env, PG_USER_ENV, field=_TARGET_FIELD), require_env(env, PG_PASSWORD_ENV, field=_TARGET_FIELD)


def _where(target: PostgresConnection) -> str:
    return f"{target.host}:{target.port}/{target.database}"


def connect_target(
    target: PostgresConnection, env: Mapping[str, str], ca: str | None = None
) -> psycopg.Connection[Any]:
    """A connection to the target, or a RunbookError saying why there is none. ``ca``: the PEM text of
    ``target.tls`` as the operator read it; an agent pod reads its mounted file (``postgres_ca``)."""
    user, password = _target_login(env)
    if ca is None:
        ca = postgres_ca(target, env, field="spec.target")
    try:
        return postgres.connect(
            host=target.host, port=target.port, database=target.database, user=user, password=password, ca=ca
        )
    except psycopg.OperationalError as error:
        problem = postgres.tls_problem(error)
        if problem is not None:
            raise RunbookError("TLSFailed", f"spec.target.{problem} ({_where(target)})") from None
        if postgres.refused(error):
            raise RunbookError(
                "TargetLoginRefused", f"{_TARGET_FIELD}: {_where(target)} refused the login {user}"
            ) from None
        raise RunbookError("TargetUnreachable", f"spec.target: {_where(target)}: {one_line(error)}") from None


def _next_value(value: Mapping[str, Any], increment: int) -> int:
    """What ``nextval`` returns next: a sequence's position, comparable along its direction."""
    return int(value["lastValue"]) + (increment if value["isCalled"] else 0)


def sequence_mismatches(expected: Mapping[str, Mapping[str, Any]], found: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The recorded sequences whose restored value is not the recorded one (or, for one that moved while
    pg_dump ran, not between the values before and after the dump); keys compared as ``(schema, name)``."""
    by_name = {postgres.parse_qualified_name(key): value for key, value in found.items()}
    wrong = []
    for key, recorded in sorted(expected.items()):
        value = by_name.get(postgres.parse_qualified_name(key))
        if value is None:
            wrong.append(f"{key}: missing")
            continue
        restored = {"lastValue": value["lastValue"], "isCalled": value["isCalled"]}
        before = {"lastValue": recorded["lastValue"], "isCalled": recorded["isCalled"]}
        after = recorded.get("afterDump")
        if after is None:
            ok = restored == before
        else:
            sign = 1 if int(value["increment"]) > 0 else -1
            low, high, at = (sign * _next_value(v, int(value["increment"])) for v in (before, after, restored))
            ok = low <= at <= high
        if not ok:
            state = "" if restored["isCalled"] else " (not called)"
            wrong.append(f"{key}: {restored['lastValue']}{state}, manifest {recorded['lastValue']}")
    return wrong


def check_contents(
    target: PostgresConnection, env: Mapping[str, str], recorded: Mapping[str, Any], ca: str | None = None
) -> dict[str, Any]:
    """The restored database against the manifest's ``source``: every table's exact rows, every sequence's value
    and the large objects' count and digest (what older manifests did not record is not checked). Returns the
    figures; a ``ContentMismatch`` unless everything matches. Counting and hashing run in the server."""
    expected_rows: Mapping[str, int] = recorded.get("tableRowCounts") or {}
    expected_sequences: Mapping[str, Mapping[str, Any]] = recorded.get("sequences") or {}
    expected_objects: Mapping[str, Any] | None = recorded.get("largeObjects")
    try:
        with connect_target(target, env, ca) as conn:
            counts = {postgres.parse_qualified_name(k): n for k, n in postgres.table_row_counts(conn).items()}
            sequences = postgres.sequence_values(conn) if expected_sequences else {}
            objects = postgres.large_objects_digest(conn) if expected_objects is not None else None
    except psycopg.Error as error:
        raise RunbookError("TargetUnreachable", f"spec.target: {_where(target)}: {one_line(error)}") from None
    found = {key: counts[name] for key in expected_rows if (name := postgres.parse_qualified_name(key)) in counts}
    missing = sorted(set(expected_rows) - set(found))
    if missing:
        raise RunbookError("ContentMismatch", f"{_where(target)} lacks tables {', '.join(missing)[:300]}")
    wrong = [f"{t}: {found[t]} rows, manifest {n}" for t, n in sorted(expected_rows.items()) if found[t] != n]
    try:
        wrong += [f"sequence {line}" for line in sequence_mismatches(expected_sequences, sequences)]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise RunbookError(
            "ManifestInvalid", "the manifest's source.sequences is not as the backup agent writes it"
        ) from None
    if objects is not None and expected_objects is not None:
        if objects["count"] != expected_objects.get("count"):
            wrong.append(f"{objects['count']} large objects, manifest {expected_objects.get('count')}")
        elif objects["sha256"] != expected_objects.get("sha256"):
            wrong.append(f"large objects differ from the manifest's (SHA-256 {objects['sha256'][:16]}…)")
    if wrong:
        raise RunbookError("ContentMismatch", f"{_where(target)}: {'; '.join(wrong)[:400]}")
    return {
        "tables": len(found),
        "rows": sum(found.values()),
        "tableRowCounts": found,
        "sequences": len(expected_sequences),
        "largeObjects": objects["count"] if objects is not None else None,
    }


def pg_restore_args(plan: RestorePlan) -> list[str]:
    """pg_restore's options: all or nothing in one transaction (committed by the agent: ``TransactionSink``),
    owners and privileges as ``spec.roles`` says."""
    args = ["--clean", "--if-exists", "--single-transaction", "--exit-on-error"]
    if plan.roles.owners == "Skip":
        args.append("--no-owner")
    if plan.roles.privileges == "Skip":
        args.append("--no-privileges")
    return args


def create_roles(plan: RestorePlan, env: Mapping[str, str]) -> list[str]:
    """``spec.roles.createMissing``: the backed-up roles the target server lacks, created before pg_restore."""
    if not plan.roles.create_missing or not plan.backup_roles:
        return []
    roles = [role.to_api() for role in plan.backup_roles]
    try:
        with connect_target(plan.target, env) as conn:
            return postgres.create_missing_roles(conn, roles)
    except psycopg.Error as error:
        user, _ = _target_login(env)
        raise RunbookError(
            "RoleCreationFailed",
            f"spec.roles.createMissing: {user} could not create the backed-up roles on {_where(plan.target)} "
            f"(it needs CREATEROLE): {one_line(error)}",
        ) from None


def restore(plan: RestorePlan, env: Mapping[str, str]) -> dict[str, Any]:
    """Restore into the target in one transaction; returns the figures."""
    user, _ = _target_login(env)
    target = plan.target
    require_signed(plan, env)  # before create_roles writes anything
    created = create_roles(plan, env)
    # The database by name only (PGDATABASE is never read as a connection string).
    child_env = {
        **env,
        "PGHOST": target.host,
        "PGPORT": str(target.port),
        "PGDATABASE": target.database,
        "PGCONNECT_TIMEOUT": "15",
    }
    sink = TransactionSink(pg_restore_args(plan), child_env)
    try:
        restored = stream(plan, env, sink).code
    except BaseException:
        sink.kill()  # psql never got the COMMIT: the server rolls the transaction back
        raise
    executed = sink.commit() if restored == 0 else sink.close()
    failed, code = (sink.psql, executed) if executed != 0 else (sink.pg_restore, restored)
    if code != 0:
        error = failed.error
        hint = ""
        if _MISSING_ROLE.search(error):
            hint = " (spec.roles: createMissing creates the backed-up roles; owners or privileges Skip ignores them)"
        elif plan.roles.owners == "Keep" and "permission denied for schema" in error:
            hint = " (spec.roles.owners Keep: each owner role needs CREATE on the schema, e.g. by owning the database)"
        raise RunbookError(
            "RestoreFailed", f"{failed.tool} into {_where(target)} as {user} rolled back (exit {code}): {error}{hint}"
        )
    return {"key": plan.key, "sizeBytes": plan.size_bytes, "target": _where(target), "rolesCreated": created}


# The kubelet keeps at most 4096 bytes of a termination message (where the operator reads an agent's summary).
TERMINATION_LOG = "/dev/termination-log"
SOURCES = ("postgresql", "redis", "kubernetes")


def report(line: str) -> None:
    """The agent's one-line summary as the pod's termination message too (where the operator reads it)."""
    if os.path.exists(TERMINATION_LOG):
        with contextlib.suppress(OSError), open(TERMINATION_LOG, "w") as log:
            log.write(line)


def read_plan(env: Mapping[str, str], variable: str, model: type[PlanModel]) -> PlanModel:
    """A Job's plan from its environment variable (JSON): ``InvalidPlan`` when it is not JSON, ``InvalidSpec``
    naming the field when it is not a ``model``."""
    raw = require_env(env, variable, field="plan")
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as error:
        raise RunbookError("InvalidPlan", f"{variable} is not JSON ({error.msg})") from None
    return parse_spec(model, document)


def verifier(source: str) -> tuple[type[StoredObjectPlan], Callable[[Any, Mapping[str, str]], dict[str, Any]]]:
    """The plan model and the reading of the backup (the preflight's, in its verify Job) of each source kind."""
    if source == "redis":
        from .restore_redis import verify_redis

        return RedisRestorePlan, verify_redis
    if source == "kubernetes":
        from .restore_kubernetes import verify_kubernetes

        return KubernetesRestorePlan, verify_kubernetes
    return RestorePlan, verify


def main(command: str, *, source: str = "postgresql", env: Mapping[str, str] | None = None) -> int:
    """The CLI entry of ``verify`` (any ``source``) and ``restore`` (PostgreSQL): exit 0 with a one-line JSON
    summary (verify: ``{"verify": "complete", "<source>": figures}``, also written as the termination message),
    or 1 with ``<command> failed: <Reason>: <message>`` as the last line of stderr (the pod's termination
    message)."""
    environment = os.environ if env is None else env
    for name in SECRET_ENVS:
        REDACTOR.register(environment.get(name))
    try:
        if command == "restore":
            plan = read_plan(environment, RESTORE_PLAN_ENV, RestorePlan)
            line = json.dumps({command: "complete", **restore(plan, environment)})
        else:
            model, read = verifier(source)
            figures = read(read_plan(environment, RESTORE_PLAN_ENV, model), environment)
            line = json.dumps({command: "complete", source: figures}, separators=(",", ":"))
            report(line)
    except RunbookError as error:
        print(f"{command} failed: {error.reason}: {REDACTOR.scrub(error.message)}", file=sys.stderr, flush=True)
        return 1
    print(line, flush=True)
    return 0
