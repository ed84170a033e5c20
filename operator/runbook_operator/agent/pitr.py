"""``runbook-operator restore-pitr``: a point-in-time restore's Job, on the volume that holds the data directory.

The plan (``RUNBOOK_PITR_PLAN``, a ``PointInTimePlan`` the operator's preflight chose from the WAL catalog)
names a base backup (with its signed manifest) and the WAL to replay as a range: the policy, the timelines, the
first and the last segment, the history files. Its size does not depend on the chain's length (one environment
string is at most 128 KiB). The Job mounts the volume at ``RUNBOOK_PGDATA_ROOT`` and gets a scratch directory
(``RUNBOOK_SCRATCH_DIR``) for the encrypted objects.

1. **Verify** (nothing on the volume is written): the base backup's manifest's signature with
   ``RUNBOOK_MANIFEST_KEY`` and its policy (``ManifestForged`` otherwise); the range listed in the bucket and
   each WAL manifest read and checked as the operator's catalog checks it (``wal_catalog.read_range``: signed,
   this policy's, naming its key's file and range): one that does not verify is ``ManifestForged``, WAL missing
   from the range ``WALGap`` naming it; the base backup downloaded to the scratch directory, its SHA-256 and
   size checked against its manifest (``ChecksumMismatch``).
2. **Stage** (beside the data directory, which is still untouched): each WAL file in turn is downloaded to the
   scratch directory, its SHA-256 and size checked, decrypted into ``.<dataDirectory>.wal.incoming/`` and its
   plain SHA-256 checked (a partial segment is then padded with zeros to its segment size, as PostgreSQL reads
   it), and its download deleted (the scratch holds the base backup and one WAL file); the base backup is
   decrypted and untarred into
   ``.<dataDirectory>.incoming/`` (mode 0700), ``recovery.signal`` and the recovery settings appended to its
   ``postgresql.auto.conf``: ``restore_command`` copying from the sibling WAL directory (a path relative to the
   data directory, which is the server's working directory, so it holds wherever the server mounts the
   volume), ``recovery_target_time`` or ``recovery_target_lsn`` (inclusive), ``recovery_target_timeline``
   and ``recovery_target_action = 'promote'``; ``latest`` sets no target: the server replays all of it.
   A failure here (``ChecksumMismatch`` of any object included) removes the staging directories: the data
   directory was never touched.
3. **Swap**: an existing data directory is renamed to ``keepPreviousAs`` (and its WAL directory beside it),
   then the staged ones take their places (two renames in the same volume).

The server started on the directory (the StatefulSet scaled back up) recovers to the target and promotes.
Exit 0 with a one-line JSON summary ``{"restore-pitr": figures}`` (also the termination message), or 1 with
``restore failed: <Reason>: <message>`` (as the restore reconciler reads a restore Job's failure).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.exceptions

from ..clients.gpg import GPG, GPGError
from ..clients.s3 import make_client
from ..errors import RunbookError
from ..logs import REDACTOR
from ..models.plans import (
    MANIFEST_KEY_ENV,
    MANIFEST_KEY_SECRET,
    PGDATA_ROOT_ENV,
    PITR_PLAN_ENV,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
    SCRATCH_DIR_ENV,
    PointInTimePlan,
    StoredObjectPlan,
    parse_lsn,
)
from ..reconcilers import wal_catalog
from ..reconcilers.wal_catalog import WALObject
from .backup import one_line, require_env
from .restore import SECRET_ENVS, ToolSink, checked_object, decryption_key, read_plan, report

COMMAND = "restore-pitr"
FAILURE = "restore failed"  # the restore Job's failure line, as the restore reconciler reads it
_CHUNK = 1024 * 1024
INCOMING = ".incoming"
RECOVERY_MARK = "# runbook-operator point-in-time restore"


@dataclass(frozen=True)
class Fetched:
    """One object of the plan, downloaded to the scratch directory and matching its manifest."""

    plan: StoredObjectPlan
    path: Path
    name: str  # the WAL file's name as PostgreSQL asks for it ("" for the base backup)
    partial: bool = False


@dataclass(frozen=True)
class Paths:
    """Where the restore writes, inside the mounted volume."""

    root: Path
    data: Path
    wal: Path
    staged: Path
    staged_wal: Path
    previous: Path | None
    previous_wal: Path | None

    @classmethod
    def of(cls, plan: PointInTimePlan, root: Path) -> Paths:
        data = inside(root, plan.data_directory, field="dataDirectory")
        previous = inside(root, plan.keep_previous_as, field="keepPreviousAs") if plan.keep_previous_as else None
        if previous is not None and (previous == data or data in previous.parents or previous in data.parents):
            raise RunbookError("InvalidPlan", "keepPreviousAs must be beside the data directory, not in or above it")
        wal = data.with_name(f"{data.name}.wal")
        return cls(
            root=root,
            data=data,
            wal=wal,
            staged=data.with_name(f".{data.name}{INCOMING}"),
            staged_wal=data.with_name(f".{wal.name}{INCOMING}"),
            previous=previous,
            previous_wal=previous.with_name(f"{previous.name}.wal") if previous is not None else None,
        )

    @property
    def restore_command(self) -> str:
        """``cp`` from the WAL directory, relative to the data directory (the server's working directory)."""
        relative = os.path.relpath(self.wal, self.data)
        return f'cp "{relative}/%f" "%p"'


def inside(root: Path, relative: str, *, field: str) -> Path:
    """``root/relative``, refused when a part is ``.`` or ``..`` (the path must stay in the volume)."""
    parts = relative.split("/")
    if not relative or any(p in ("", ".", "..") for p in parts):
        raise RunbookError("InvalidPlan", f"{field} {relative!r}: a path inside the volume, without . or ..")
    return root.joinpath(*parts)


# --- 1. verify -------------------------------------------------------------------------------------------------


def base_plan(plan: PointInTimePlan, signing_key: str) -> StoredObjectPlan:
    """The base backup's object, its manifest's signature and policy verified; ``ManifestForged`` otherwise."""
    why = wal_catalog.foreign(
        plan.base_manifest, signing_key=signing_key, namespace=plan.wal.namespace, policy=plan.wal.policy
    )
    if why is not None:
        raise RunbookError(
            "ManifestForged",
            f"{plan.base_key}: its manifest is {why} ({MANIFEST_KEY_ENV}, Secret {MANIFEST_KEY_SECRET})",
        )
    return _stored(plan, plan.base_key, plan.base_manifest)


def wal_files(client: Any, plan: PointInTimePlan, signing_key: str) -> list[WALObject]:
    """The plan's WAL range as the bucket holds it, each manifest verified (``wal_catalog.read_range``)."""
    try:
        return wal_catalog.read_range(client, plan.location, plan.wal, path=plan.timeline, signing_key=signing_key)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise RunbookError("DownloadFailed", f"S3: reading the WAL manifests: {one_line(error)}") from None


def _stored(plan: PointInTimePlan, key: str, manifest: Mapping[str, Any]) -> StoredObjectPlan:
    try:
        return StoredObjectPlan(
            location=plan.location,
            key=key,
            sha256=str(manifest["sha256"]),
            size_bytes=int(manifest["sizeBytes"]),
            symmetric=bool(manifest["symmetric"]),
            manifest=dict(manifest),
        )
    except (KeyError, TypeError, ValueError):
        raise RunbookError("ManifestInvalid", f"{key}: its manifest has no sha256, sizeBytes and symmetric") from None


PARTIAL_ATTEMPTS = 5


def fetch(
    client: Any,
    plan: PointInTimePlan,
    wanted: WALObject,
    path: Path,
    *,
    env: Mapping[str, str],
    signing_key: str,
) -> Fetched:
    """The WAL file downloaded and matching its manifest. A partial segment is re-shipped by the receiver while the
    restore runs (and replaced by its complete segment once that is written): when the one read no longer
    matches, the bucket's current manifest of that segment is read again (``wal_catalog.current_file``)."""
    for attempt in range(PARTIAL_ATTEMPTS if wanted.partial else 1):
        item = _stored(plan, wanted.key, wanted.manifest)
        try:
            download(client, item, env, path)
            return Fetched(item, path, wanted.name, wanted.partial)
        except RunbookError as error:
            retry = wanted.partial and attempt + 1 < PARTIAL_ATTEMPTS
            if not retry or error.reason not in ("ChecksumMismatch", "BackupNotFound"):
                raise
            newer = wal_catalog.current_file(client, plan.location, plan.wal, wanted, signing_key=signing_key)
            if newer is None:
                raise
            wanted = newer
    raise AssertionError("unreachable")


def download(client: Any, item: StoredObjectPlan, env: Mapping[str, str], path: Path) -> None:
    """The object into ``path``; ``ChecksumMismatch`` unless its SHA-256 and size are the manifest's."""
    with checked_object(item, env, client=client, field="spec.pointInTime") as (reader, _), path.open("wb") as out:
        while chunk := reader.read(_CHUNK):
            out.write(chunk)


# --- 2. stage --------------------------------------------------------------------------------------------------


def decrypt_wal(gpg: GPG, fetched: Fetched, passphrase: str | None, into: Path) -> None:
    """The WAL file decrypted into ``into/<name>``, its plain SHA-256 checked, a partial padded."""
    expected = str((fetched.plan.manifest or {}).get("plainSha256") or "")
    digest = hashlib.sha256()
    target = into / fetched.name
    with fetched.path.open("rb") as source, target.open("wb") as out:

        def sink(chunk: bytes) -> None:
            digest.update(chunk)
            out.write(chunk)

        _decrypt(gpg, source, sink, passphrase, fetched.plan)
        if digest.hexdigest() != expected:
            raise RunbookError(
                "ChecksumMismatch",
                f"{fetched.plan.key}: decrypted, its SHA-256 {digest.hexdigest()[:16]}… is not its manifest's "
                f"plainSha256 {expected[:16]}…; nothing was restored",
            )
        if fetched.partial:
            size = int((fetched.plan.manifest or {}).get("segmentBytes") or 0)
            written = out.tell()
            if size > written:
                out.truncate(size)  # zeros: where PostgreSQL's reading of the segment ends
        out.flush()
        os.fsync(out.fileno())


def decrypt_base(gpg: GPG, fetched: Fetched, passphrase: str | None, into: Path, env: Mapping[str, str]) -> None:
    """The base backup's tar decrypted into ``tar --extract`` in ``into``."""
    tar = ToolSink(
        ["tar", "--extract", "--file", "-", "--directory", str(into), "--no-same-owner", "--delay-directory-restore"],
        {k: v for k, v in env.items() if k not in SECRET_ENVS},
    )
    try:
        with fetched.path.open("rb") as source:
            _decrypt(gpg, source, tar.write, passphrase, fetched.plan)
    except BaseException:
        tar.kill()
        raise
    code = tar.finish()
    if code != 0:
        raise RunbookError("ArchiveUnreadable", f"tar cannot extract {fetched.plan.key} (exit {code}): {tar.error}")
    if not (into / "PG_VERSION").is_file():
        raise RunbookError("ArchiveUnreadable", f"{fetched.plan.key} is not a data directory's tar (no PG_VERSION)")


def _decrypt(gpg: GPG, source: Any, sink: Any, passphrase: str | None, item: StoredObjectPlan) -> None:
    try:
        gpg.decrypt_stream(source, sink, passphrase=passphrase)
    except GPGError as error:
        key = "the passphrase" if item.symmetric else "the private key in spec.decryptionSecretRef"
        raise RunbookError("DecryptionFailed", f"{item.key}: {one_line(error)} with {key}") from None


def postgres_time(text: str) -> str:
    """An RFC 3339 time as PostgreSQL's timestamptz input (UTC); ``InvalidPlan`` when it is not one."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RunbookError("InvalidPlan", f"targetTime {text!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise RunbookError("InvalidPlan", f"targetTime {text!r} has no time zone")
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def recovery_settings(plan: PointInTimePlan, paths: Paths) -> list[str]:
    """The lines appended to ``postgresql.auto.conf`` (values quoted; every one is checked before)."""
    lines = [RECOVERY_MARK, f"restore_command = '{paths.restore_command}'"]
    if plan.target_time is not None:
        lines.append(f"recovery_target_time = '{postgres_time(plan.target_time)}'")
    elif plan.target_lsn is not None:
        try:
            parse_lsn(plan.target_lsn)
        except ValueError:
            raise RunbookError("InvalidPlan", f"targetLSN {plan.target_lsn!r} is not a WAL location") from None
        lines.append(f"recovery_target_lsn = '{plan.target_lsn}'")
    if plan.target_time is not None or plan.target_lsn is not None:
        lines += ["recovery_target_inclusive = on", "recovery_target_action = 'promote'"]
    lines.append(f"recovery_target_timeline = '{plan.timeline}'")
    return lines


def prepare(plan: PointInTimePlan, paths: Paths) -> None:
    """The staged data directory made ready to recover: recovery.signal, the settings, pg_wal, mode 0700."""
    staged = paths.staged
    for leftover in ("standby.signal", "postmaster.pid", "recovery.signal"):
        (staged / leftover).unlink(missing_ok=True)
    (staged / "pg_wal").mkdir(mode=0o700, exist_ok=True)
    auto = staged / "postgresql.auto.conf"
    kept = auto.read_text().splitlines() if auto.exists() else []
    if RECOVERY_MARK in kept:  # a base backup of a server restored this way before: its old settings go
        kept = kept[: kept.index(RECOVERY_MARK)]
    auto.write_text("\n".join([*kept, *recovery_settings(plan, paths)]) + "\n")
    (staged / "recovery.signal").write_text("")
    for directory in (staged, paths.staged_wal):
        directory.chmod(0o700)


# --- 3. swap ---------------------------------------------------------------------------------------------------


def swap(paths: Paths) -> str | None:
    """The staged directories in place; the replaced data directory's new path (relative), if there was one."""
    kept: str | None = None
    if paths.data.exists():
        assert paths.previous is not None  # checked before anything was written
        paths.data.rename(paths.previous)
        kept = str(paths.previous.relative_to(paths.root))
    if paths.wal.exists():
        if paths.previous_wal is not None:
            paths.wal.rename(paths.previous_wal)
        else:
            shutil.rmtree(paths.wal)
    paths.staged_wal.rename(paths.wal)
    paths.staged.rename(paths.data)
    _fsync_dir(paths.data.parent)
    return kept


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_volume(paths: Paths) -> None:
    """Refused before anything is read: the volume missing, a data directory to replace with nowhere to keep it,
    or the name to keep it under taken."""
    if not paths.root.is_dir():
        raise RunbookError("VolumeMissing", f"{PGDATA_ROOT_ENV}: {paths.root} is not a mounted directory")
    if paths.data.exists() and paths.previous is None:
        raise RunbookError(
            "DataDirectoryExists",
            f"spec.pointInTime.dataDirectory: {paths.data.relative_to(paths.root)} exists on the new volume",
        )
    for taken in (paths.previous, paths.previous_wal):
        if taken is not None and taken.exists() and paths.data.exists():
            raise RunbookError(
                "PreviousExists", f"{taken.relative_to(paths.root)} exists: the data directory cannot be kept there"
            )
    paths.data.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def _remove(*directories: Path) -> None:
    for directory in directories:
        if directory.exists():
            shutil.rmtree(directory)


# --- the run ---------------------------------------------------------------------------------------------------


def restore_pitr(plan: PointInTimePlan, env: Mapping[str, str]) -> dict[str, Any]:
    """Verify, stage, swap; returns the figures."""
    root = Path(require_env(env, PGDATA_ROOT_ENV, field="the restore Job's volume mount"))
    signing_key = require_env(env, MANIFEST_KEY_ENV, field=f"Secret {MANIFEST_KEY_SECRET}")
    paths = Paths.of(plan, root)
    base = base_plan(plan, signing_key)
    check_volume(paths)
    client = make_client(plan.location, env.get(S3_ACCESS_KEY_ENV), env.get(S3_SECRET_KEY_ENV))
    files = wal_files(client, plan, signing_key)
    scratch_root = Path(env.get(SCRATCH_DIR_ENV) or tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="pitr-", dir=scratch_root) as scratch, GPG() as gpg:
        downloaded = Path(scratch) / "base.tar.gpg"
        download(client, base, env, downloaded)
        passphrase = decryption_key(gpg, base, env)
        _remove(paths.staged, paths.staged_wal)  # an earlier run's, stopped halfway
        try:
            paths.staged_wal.mkdir(mode=0o700)
            for wanted in files:
                fetched = fetch(client, plan, wanted, Path(scratch) / "wal.gpg", env=env, signing_key=signing_key)
                decrypt_wal(gpg, fetched, passphrase, paths.staged_wal)
                fetched.path.unlink()
            paths.staged.mkdir(mode=0o700)
            decrypt_base(gpg, Fetched(base, downloaded, ""), passphrase, paths.staged, env)
            prepare(plan, paths)
        except BaseException:
            _remove(paths.staged, paths.staged_wal)
            raise
    kept = swap(paths)
    segments = [f.name for f in files if not f.history]
    return {
        "baseBackup": plan.base_key,
        "segments": len(segments),
        "firstSegment": segments[0] if segments else None,
        "lastSegment": segments[-1] if segments else None,
        "historyFiles": len(files) - len(segments),
        "dataDirectory": plan.data_directory,
        "previousDataDirectory": kept,
        "target": plan.target_time or plan.target_lsn or "latest",
    }


def main(env: Mapping[str, str] | None = None) -> int:
    environment = os.environ if env is None else env
    for name in SECRET_ENVS:
        REDACTOR.register(environment.get(name))
    os.umask(0o077)  # a data directory's files: the server's user only
    try:
        figures = restore_pitr(read_plan(environment, PITR_PLAN_ENV, PointInTimePlan), environment)
        line = json.dumps({COMMAND: figures}, separators=(",", ":"))
        report(line)
    except RunbookError as error:
        print(f"{FAILURE}: {error.reason}: {REDACTOR.scrub(error.message)}", file=sys.stderr, flush=True)
        return 1
    print(line, flush=True)
    return 0
