"""``runbook-operator verify`` and ``restore``: a backup streamed ``S3 -> gpg -> pg_restore``, no plaintext on disk.

``verify`` (the restore's preflight) reads the whole stored object: its size and SHA-256 are computed while
streaming and must match the manifest, gpg must decrypt it completely, and ``pg_restore --list`` must read
its table of contents and find the data of every table the manifest recorded. It writes nothing anywhere.

``restore`` streams the same way into ``pg_restore --clean --if-exists --single-transaction --exit-on-error``.
The object's last bytes are held back until its SHA-256 matched the manifest, so pg_restore never receives
the whole archive of an object that changed after the preflight: its transaction fails on the truncated
archive and rolls back. Any failure halfway rolls back the same way: the database is either restored
completely or left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import IO, Any

import botocore.exceptions
import psycopg
from pydantic import Field

from ..clients import postgres
from ..clients.gpg import GPG, GPGError
from ..clients.s3 import make_client
from ..errors import RunbookError, parse_spec
from ..logs import REDACTOR
from ..models.common import CamelModel
from ..models.sources import PostgresConnection, S3Location
from . import (
    GPG_PASSPHRASE_ENV,
    GPG_PRIVATE_KEY_ENV,
    PG_PASSWORD_ENV,
    PG_USER_ENV,
    RESTORE_PLAN_ENV,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
)
from .backup import one_line, require_env

SECRET_ENVS = (PG_PASSWORD_ENV, S3_SECRET_KEY_ENV, GPG_PASSPHRASE_ENV, GPG_PRIVATE_KEY_ENV)
# Ciphertext held back until the whole object's SHA-256 matched: far more than gpg's closing packets, so
# without it the archive pg_restore receives is always incomplete.
HOLD_BACK = 1024 * 1024
_READ_SIZE = 64 * 1024
_TARGET_FIELD = "spec.target.credentialsSecretRef"


class RestorePlan(CamelModel):
    """What one restore or verify run reads and where it writes (references only, never a secret)."""

    location: S3Location = Field(description="The policy's bucket.")
    key: str = Field(description="Key of the encrypted data object.")
    sha256: str = Field(description="SHA-256 of the object, from the manifest.")
    size_bytes: int = Field(description="Size of the object, from the manifest.")
    symmetric: bool = Field(description="Encrypted with a passphrase (else to public keys).")
    tables: list[str] = Field(default_factory=list, description="Tables the manifest recorded (schema.table).")
    target: PostgresConnection = Field(description="The database to restore into.")


class ChecksummedReader:
    """The stored object as a file: size and SHA-256 computed on the way. With ``hold_back``, the last bytes
    are released only once the whole object has matched the expected size and digest."""

    def __init__(self, body: Any, *, sha256: str, size: int, hold_back: int = 0) -> None:
        self._body = body
        self._expected = (sha256, size)
        self._hold_back = hold_back
        self._digest = hashlib.sha256()
        self._pending = bytearray()
        self._eof = False
        self.size = 0

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    @property
    def matches(self) -> bool:
        """Whether everything was read and it is the expected object."""
        return self._eof and (self.sha256, self.size) == self._expected

    def _fill(self, wanted: int) -> None:
        while not self._eof and len(self._pending) < wanted:
            chunk = self._body.read(_READ_SIZE)
            if not chunk:
                self._eof = True
                break
            self._digest.update(chunk)
            self.size += len(chunk)
            self._pending += chunk

    def read(self, size: int = -1) -> bytes:
        wanted = _READ_SIZE if size is None or size < 0 else size
        self._fill(wanted + self._hold_back)
        if self._eof and not self.matches:
            return b""  # the held-back end of a changed object is never released
        releasable = len(self._pending) - (0 if self._eof else self._hold_back)
        count = max(0, min(wanted, releasable))
        chunk = bytes(self._pending[:count])
        del self._pending[:count]
        return chunk

    def drain(self) -> None:
        """Read (and digest) the rest, e.g. after gpg stopped early, so ``matches`` is known."""
        while not self._eof:
            self._pending.clear()
            self._fill(_READ_SIZE)
        self._pending.clear()

    def close(self) -> None:
        self._body.close()


class ToolSink:
    """A tool reading the plaintext on its stdin. Once it exited, further chunks are dropped (``pg_restore
    --list`` stops after the table of contents); each stdout line goes to ``on_line``."""

    def __init__(self, args: list[str], env: Mapping[str, str], on_line: Callable[[str], None] | None = None) -> None:
        self.tool = args[0]
        self._process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env)
        )
        self._stderr: deque[str] = deque(maxlen=20)
        self._on_line = on_line or (lambda _line: None)
        self._closed = False
        self._readers = [
            threading.Thread(target=self._read, args=(self._process.stdout, self._on_line), daemon=True),
            threading.Thread(target=self._read, args=(self._process.stderr, self._stderr.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe: IO[bytes] | None, consume: Callable[[str], None]) -> None:
        assert pipe is not None
        for raw in pipe:
            consume(raw.decode(errors="replace").rstrip("\n"))

    def write(self, chunk: bytes) -> None:
        if self._closed:
            return
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(chunk)
        except (BrokenPipeError, ValueError):
            self._closed = True

    def finish(self) -> int:
        """Close stdin and wait for the tool's exit code."""
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        code = self._process.wait()
        for reader in self._readers:
            reader.join(5)
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


def open_object(plan: RestorePlan, env: Mapping[str, str]) -> Any:
    """The body of the stored object, streaming."""
    client = make_client(plan.location, env.get(S3_ACCESS_KEY_ENV), env.get(S3_SECRET_KEY_ENV))
    try:
        return client.get_object(Bucket=plan.location.bucket, Key=plan.key)["Body"]
    except botocore.exceptions.ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", "Error"))
        if code in ("NoSuchKey", "404"):
            raise RunbookError("BackupNotFound", f"spec.backup: the data object {plan.key} is missing") from None
        raise RunbookError("DownloadFailed", f"S3: {code}") from None
    except botocore.exceptions.BotoCoreError as error:
        raise RunbookError("DownloadFailed", f"S3: {one_line(error)}") from None


def decryption_key(gpg: GPG, plan: RestorePlan, env: Mapping[str, str]) -> str | None:
    """Import the private key (public-key backups), or return the passphrase (symmetric backups)."""
    if plan.symmetric:
        return require_env(env, GPG_PASSPHRASE_ENV, field="spec.encryption.gpg.passphraseSecretRef")
    armored = require_env(env, GPG_PRIVATE_KEY_ENV, field="spec.decryptionSecretRef")
    if not gpg.import_secret_key(armored):
        raise RunbookError("InvalidDecryptionKey", "spec.decryptionSecretRef: no private key in the given data")
    return None


def stream(plan: RestorePlan, env: Mapping[str, str], sink: ToolSink, *, hold_back: int) -> int:
    """Object -> gpg -> the tool; the tool's exit code once size, digest and decryption all checked out."""
    REDACTOR.register(env.get(GPG_PRIVATE_KEY_ENV))
    with GPG() as gpg:
        try:
            passphrase = decryption_key(gpg, plan, env)
            body = open_object(plan, env)
        except BaseException:
            sink.kill()
            raise
        reader = ChecksummedReader(body, sha256=plan.sha256, size=plan.size_bytes, hold_back=hold_back)
        decrypt_error: GPGError | None = None
        try:
            gpg.decrypt_stream(reader, sink.write, passphrase=passphrase)  # type: ignore[arg-type]
        except GPGError as error:
            decrypt_error = error
        finally:
            code = sink.finish()  # EOF: a pg_restore that did not get the whole archive fails and rolls back
            try:
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
    if decrypt_error is not None:
        key = "the passphrase" if plan.symmetric else "the private key in spec.decryptionSecretRef"
        raise RunbookError("DecryptionFailed", f"{one_line(decrypt_error)} with {key}")
    return code


def verify(plan: RestorePlan, env: Mapping[str, str]) -> dict[str, Any]:
    """The preflight: checksum, decryption and ``pg_restore --list``; returns the figures."""
    entries: list[str] = []
    tables: set[str] = set()

    def listed(line: str) -> None:
        if line and not line.startswith(";"):
            entries.append(line)
            # "<id>; <oid> <oid> TABLE DATA <schema> <table> <owner>"
            words = line.split()
            if words[3:5] == ["TABLE", "DATA"] and len(words) >= 7:
                tables.add(f"{words[5]}.{words[6]}")

    sink = ToolSink(["pg_restore", "--list"], env, listed)
    code = stream(plan, env, sink, hold_back=0)
    if code != 0 or not entries:
        raise RunbookError("ArchiveUnreadable", f"pg_restore --list cannot read {plan.key}: {sink.error}")
    missing = sorted(set(plan.tables) - tables)
    if missing:
        raise RunbookError("ArchiveIncomplete", f"{plan.key} has no data for {', '.join(missing)[:300]}")
    return {"sha256": plan.sha256, "sizeBytes": plan.size_bytes, "archiveEntries": len(entries)}


def _target_login(env: Mapping[str, str]) -> tuple[str, str]:
    return require_env(env, PG_USER_ENV, field=_TARGET_FIELD), require_env(env, PG_PASSWORD_ENV, field=_TARGET_FIELD)


def _where(target: PostgresConnection) -> str:
    return f"{target.host}:{target.port}/{target.database}"


def connect_target(target: PostgresConnection, env: Mapping[str, str]) -> psycopg.Connection[Any]:
    """A connection to the target, or a RunbookError saying why there is none."""
    user, password = _target_login(env)
    try:
        return postgres.connect(
            host=target.host, port=target.port, database=target.database, user=user, password=password
        )
    except psycopg.OperationalError as error:
        if postgres.refused(error):
            raise RunbookError(
                "TargetLoginRefused", f"{_TARGET_FIELD}: {_where(target)} refused the login {user}"
            ) from None
        raise RunbookError("TargetUnreachable", f"spec.target: {_where(target)}: {one_line(error)}") from None


def count_rows(target: PostgresConnection, env: Mapping[str, str], expected: Mapping[str, int]) -> dict[str, int]:
    """Rows of the manifest's tables in the restored database; a RunbookError unless every count matches."""
    with connect_target(target, env) as conn:
        counts = postgres.table_row_counts(conn)
    found = {table: counts[table] for table in expected if table in counts}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise RunbookError("ContentMismatch", f"{_where(target)} lacks tables {', '.join(missing)[:300]}")
    wrong = [f"{t}: {found[t]} rows, manifest {n}" for t, n in sorted(expected.items()) if found[t] != n]
    if wrong:
        raise RunbookError("ContentMismatch", f"{_where(target)}: {'; '.join(wrong)[:400]}")
    return found


def restore(plan: RestorePlan, env: Mapping[str, str]) -> dict[str, Any]:
    """Restore into the target in one transaction; returns the figures."""
    user, _ = _target_login(env)
    target = plan.target
    child_env = {**env, "PGHOST": target.host, "PGPORT": str(target.port), "PGCONNECT_TIMEOUT": "15"}
    args = ["--clean", "--if-exists", "--no-owner", "--single-transaction", "--exit-on-error", "--no-password"]
    sink = ToolSink(["pg_restore", *args, "--dbname", target.database], child_env)
    code = stream(plan, env, sink, hold_back=HOLD_BACK)
    if code != 0:
        raise RunbookError(
            "RestoreFailed", f"pg_restore into {_where(target)} as {user} rolled back (exit {code}): {sink.error}"
        )
    return {"key": plan.key, "sizeBytes": plan.size_bytes, "target": _where(target)}


def main(command: str, *, env: Mapping[str, str] | None = None) -> int:
    """The CLI entry of ``verify`` and ``restore``: exit 0 with a one-line JSON summary, or 1 with
    ``<command> failed: <Reason>: <message>`` as the last line of stderr (the pod's termination message)."""
    environment = os.environ if env is None else env
    for name in SECRET_ENVS:
        REDACTOR.register(environment.get(name))
    try:
        raw = require_env(environment, RESTORE_PLAN_ENV, field="plan")
        try:
            document = json.loads(raw)
        except json.JSONDecodeError as error:
            raise RunbookError("InvalidPlan", f"{RESTORE_PLAN_ENV} is not JSON ({error.msg})") from None
        plan = parse_spec(RestorePlan, document)
        result = restore(plan, environment) if command == "restore" else verify(plan, environment)
    except RunbookError as error:
        print(f"{command} failed: {error.reason}: {REDACTOR.scrub(error.message)}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps({command: "complete", **result}), flush=True)
    return 0
