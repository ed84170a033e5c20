"""``runbook-operator restore-redis`` and the Redis preflight: an RDB put back into a running Redis, with no
plaintext on any disk.

The operator does not own the runbook's Redis (its StatefulSet, volume and config are the application's), so
the restore cannot swap ``dump.rdb`` under the server and restart it: that needs write access to the server's
volume and a restart of a workload the operator does not manage, and a server restarted on a wrong file has
lost its data. Instead, in the restore Job's pod:

1. the object is streamed ``S3 -> gpg`` into the pod's memory-backed scratch volume (``emptyDir`` with
   ``medium: Memory``, sized from the manifest); its SHA-256 must match the manifest;
2. a scratch ``redis-server`` loads it (on a Unix socket in that volume: no TCP port, no persistence), which
   checks the RDB's own CRC64; the file is then deleted;
3. the scratch server's keys per db, plus the keys it dropped on load because their TTL had run out since the
   backup, must equal the manifest's ``keyspace``. Only then is the target touched:
4. ``FLUSHALL`` of the target, then every key copied with ``DUMP`` / ``RESTORE ... REPLACE`` and its
   remaining ``PTTL`` (types and encodings exactly as saved);
5. the target's keys per db must equal the scratch server's, and sampled keys (a share of each db) must have
   equal values, compared type by type, and TTLs within a second.

The preflight's verify Job (``runbook-operator verify --source redis``, ``verify_redis``) streams the whole
object through gpg too and checks its SHA-256 and that the plaintext is an RDB file (magic, version, the EOF
opcode before its checksum); the operator logs into the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import redis

from ..clients import redis as redis_client
from ..errors import RunbookError
from ..logs import REDACTOR
from ..models.plans import REDIS_PASSWORD_ENV, RESTORE_PLAN_ENV, SCRATCH_DIR_ENV, RedisRestorePlan
from ..models.sources import RedisConnection
from .backup import one_line, redis_tls, require_env
from .restore import SECRET_ENVS, read_plan, report, stream

TARGET_FIELD = "spec.target.redis"
RDB_FILE = "dump.rdb"
_MAGIC = b"REDIS"
_EOF_OPCODE = 0xFF
# ``redis-cli --rdb -`` writing to a pipe cannot cut off the 40-byte end mark of a diskless transfer, so the
# stored RDB may end with it after the checksum (redis-server stops reading at the EOF opcode).
_DISKLESS_MARK = 40
_TAIL = 9 + _DISKLESS_MARK
_BATCH = 500
_TTL_SLACK_MS = 1000
_LOAD_TIMEOUT = 600.0


def where(target: RedisConnection) -> str:
    return f"{target.host}:{target.port}"


# --- the target -----------------------------------------------------------------------------------------


def connect_target(target: RedisConnection, env: Mapping[str, str], material: Any = None) -> redis.Redis:
    """A client of the target, logged in (PING answered), or a RunbookError naming the field. ``material``:
    the TLS PEM texts (the operator reads them from Secrets); else read from the pod's Secret volumes."""
    password = ""
    if target.password_secret_ref is not None:
        password = require_env(env, REDIS_PASSWORD_ENV, field=f"{TARGET_FIELD}.passwordSecretRef")
    if material is None:
        _, material = redis_tls(target, env)
    try:
        client = redis_client.connect(
            host=target.host,
            port=target.port,
            tls=target.tls,
            material=material,
            user=target.username or "default",
            password=password,
        )
        client.ping()
    except redis_client.TLSFault as fault:
        raise RunbookError("TargetUnreachable", f"{TARGET_FIELD}.tls.{fault}") from None
    except redis.AuthenticationError:
        user = target.username or "default"
        raise RunbookError(
            "TargetLoginRefused", f"{TARGET_FIELD}.passwordSecretRef: {where(target)} refused the login {user}"
        ) from None
    except redis.RedisError as error:
        raise RunbookError("TargetUnreachable", f"{TARGET_FIELD}: {where(target)}: {one_line(error)}") from None
    return client


def on_db(client: redis.Redis, db: int) -> redis.Redis:
    """The same connection settings (TLS, login) on another db."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "db": db}
    return redis.Redis.from_pool(redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


def keyspace(client: redis.Redis) -> dict[str, int]:
    """Keys per db as INFO keyspace counts them: ``{"db0": n}``."""
    return {db: int(stats["keys"]) for db, stats in client.info("keyspace").items() if int(stats["keys"])}


def _db(name: str) -> int:
    return int(name.removeprefix("db"))


# --- the plaintext --------------------------------------------------------------------------------------


class RdbProbe:
    """A sink that keeps the first and last bytes of the plaintext: enough to tell an RDB file."""

    def __init__(self, path: Path | None = None) -> None:
        self.head = b""
        self.tail = b""
        self.size = 0
        self._file = open(path, "xb") if path is not None else None  # noqa: SIM115 - closed in finish/kill
        if path is not None:
            os.chmod(path, 0o600)

    def write(self, chunk: bytes) -> None:
        if len(self.head) < 9:
            self.head += chunk[: 9 - len(self.head)]
        self.tail = (self.tail + chunk)[-_TAIL:]
        self.size += len(chunk)
        if self._file is not None:
            self._file.write(chunk)

    def finish(self) -> int:
        if self._file is not None:
            self._file.close()
        return 0

    def kill(self) -> None:
        self.finish()

    def problem(self) -> str | None:
        """Why this is not a whole RDB file, or None."""
        if not self.head.startswith(_MAGIC) or not self.head[5:9].isdigit():
            return "the plaintext is not an RDB file (no REDIS magic)"
        ends = [self.tail[-9]] if len(self.tail) >= 9 else []
        if len(self.tail) == _TAIL:
            ends.append(self.tail[0])
        if _EOF_OPCODE not in ends:
            return "the RDB file is truncated (no EOF opcode before its checksum)"
        return None

    @property
    def version(self) -> int:
        return int(self.head[5:9])


def verify_redis(plan: RedisRestorePlan, env: Mapping[str, str]) -> dict[str, Any]:
    """The preflight's reading of the object: SHA-256, full decryption, an RDB file; nothing written."""
    probe = RdbProbe()
    streamed = stream(plan, env, probe)
    problem = probe.problem()
    if problem is not None:
        raise RunbookError("ArchiveUnreadable", f"{plan.key}: {problem}")
    return {"sha256": plan.sha256, "sizeBytes": plan.size_bytes, "etag": streamed.etag, "rdbVersion": probe.version}


# --- the scratch server ---------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_server(directory: Path, databases: int) -> Iterator[tuple[redis.Redis, dict[str, Any]]]:
    """redis-server on the RDB in ``directory``: a Unix socket only, no persistence; the file is deleted once
    loaded. Yields a client and the load's figures."""
    socket = directory / "redis.sock"
    process = subprocess.Popen(
        [
            *("redis-server", "--port", "0", "--unixsocket", str(socket), "--unixsocketperm", "700"),
            *("--dir", str(directory), "--dbfilename", RDB_FILE, "--save", "", "--appendonly", "no"),
            *("--databases", str(databases), "--logfile", "", "--loglevel", "warning"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        client = redis.Redis(unix_socket_path=str(socket), socket_timeout=60)
        deadline = time.monotonic() + _LOAD_TIMEOUT
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                raise RunbookError("ArchiveUnreadable", f"redis-server cannot load the RDB: {one_line(output)}")
            try:
                if not int(client.info("persistence").get("loading", 0)):
                    break
            except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                pass
            if time.monotonic() > deadline:
                raise RunbookError("RestoreFailed", "the scratch redis-server did not load the RDB in time")
            time.sleep(0.05)
        (directory / RDB_FILE).unlink(missing_ok=True)  # loaded: its memory goes back
        persistence = client.info("persistence")
        yield client, {"expiredOnLoad": int(persistence.get("rdb_last_load_keys_expired", 0))}
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for leftover in (directory / RDB_FILE, socket):
            leftover.unlink(missing_ok=True)


def check_loaded(plan: RedisRestorePlan, loaded: Mapping[str, int], expired: int) -> None:
    """The scratch copy against the manifest: each db at most as recorded, and the difference exactly the keys
    whose TTL ran out since the backup."""
    over = [
        f"{db}: {n} keys, manifest {plan.keyspace.get(db, 0)}"
        for db, n in loaded.items()
        if n > plan.keyspace.get(db, 0)
    ]
    missing = sum(plan.keyspace.values()) - sum(loaded.values())
    if over or missing != expired:
        detail = "; ".join(over) or f"{missing} keys fewer than the manifest's, {expired} of them expired since"
        raise RunbookError("ContentMismatch", f"{plan.key} does not hold the recorded keyspace: {detail}")


# --- copying and comparing ------------------------------------------------------------------------------


def copy_db(source: redis.Redis, target: redis.Redis, sample_every: int) -> tuple[list[bytes], int]:
    """Every key of ``source`` into ``target`` (DUMP, PTTL, RESTORE ... REPLACE); the sampled keys and how many
    expired meanwhile."""
    sampled: list[bytes] = []
    expired = 0
    batch: list[bytes] = []

    def flush() -> None:
        nonlocal expired
        reading = source.pipeline(transaction=False)
        for key in batch:
            reading.dump(key)
            reading.pttl(key)
        answers = reading.execute()
        writing = target.pipeline(transaction=False)
        for index, key in enumerate(batch):
            payload, ttl = answers[2 * index], answers[2 * index + 1]
            if payload is None or ttl == -2:
                expired += 1
                continue
            writing.restore(key, max(int(ttl), 0), payload, replace=True)
        writing.execute()
        batch.clear()

    for seen, key in enumerate(source.scan_iter(count=1000)):
        if seen % sample_every == 0:
            sampled.append(key)
        batch.append(key)
        if len(batch) >= _BATCH:
            flush()
    if batch:
        flush()
    return sampled, expired


def _value(client: redis.Redis, key: bytes) -> Any:
    kind = client.type(key)
    if kind == b"string":
        return client.get(key)
    if kind == b"hash":
        return client.hgetall(key)
    if kind == b"list":
        return client.lrange(key, 0, -1)
    if kind == b"set":
        return sorted(client.smembers(key))
    if kind == b"zset":
        return client.zrange(key, 0, -1, withscores=True)
    if kind == b"stream":
        return client.xrange(key)
    return client.dump(key)  # module types: their serialization


def differing(source: redis.Redis, target: redis.Redis, keys: list[bytes]) -> int:
    """How many of ``keys`` differ between the two servers in type, value or TTL (beyond a second)."""
    wrong = 0
    for key in keys:
        ttl_source, ttl_target = source.pttl(key), target.pttl(key)
        if ttl_source == -2:
            continue  # expired meanwhile
        same_ttl = (ttl_source < 0) == (ttl_target < 0) and abs(int(ttl_source) - int(ttl_target)) <= _TTL_SLACK_MS
        if not same_ttl or source.type(key) != target.type(key) or _value(source, key) != _value(target, key):
            wrong += 1
    return wrong


def restore_redis(plan: RedisRestorePlan, env: Mapping[str, str]) -> dict[str, Any]:
    """Load the RDB into a scratch server, check it, then flush the target and copy every key; the figures."""
    started = time.monotonic()
    directory = Path(require_env(env, SCRATCH_DIR_ENV, field="the Job's scratch volume"))
    target = connect_target(plan.target, env)
    probe = RdbProbe(directory / RDB_FILE)
    try:
        stream(plan, env, probe)
    except BaseException:
        (directory / RDB_FILE).unlink(missing_ok=True)
        raise
    problem = probe.problem()
    if problem is not None:
        (directory / RDB_FILE).unlink(missing_ok=True)
        raise RunbookError("ArchiveUnreadable", f"{plan.key}: {problem}")
    databases = max([16, *(_db(db) + 1 for db in plan.keyspace)])
    with scratch_server(directory, databases) as (scratch, load):
        loaded = keyspace(scratch)
        check_loaded(plan, loaded, load["expiredOnLoad"])
        try:
            target.flushall()
            expired, sampled, wrong = 0, 0, 0
            for db in sorted(loaded, key=_db):
                source_db, target_db = on_db(scratch, _db(db)), on_db(target, _db(db))
                keys, gone = copy_db(source_db, target_db, plan.sample_every)
                expired += gone
                sampled += len(keys)
                wrong += differing(source_db, target_db, keys)
            restored = keyspace(target)
            now = keyspace(scratch)
        except redis.RedisError as error:
            raise RunbookError(
                "RestoreFailed", f"{where(plan.target)}: copying the keys failed: {one_line(error)}"
            ) from None
        memory = scratch.info("memory")
    if restored != now:
        raise RunbookError("ContentMismatch", f"{where(plan.target)} holds {restored} keys, the backup {now}")
    if wrong:
        raise RunbookError("ContentMismatch", f"{wrong} of {sampled} sampled keys differ on {where(plan.target)}")
    return {
        "key": plan.key,
        "sizeBytes": plan.size_bytes,
        "target": where(plan.target),
        "keyspace": restored,
        "keys": sum(restored.values()),
        "volatile": {db: int(s.get("expires", 0)) for db, s in target.info("keyspace").items()},
        "expiredSinceBackup": load["expiredOnLoad"] + expired,
        "sampledKeys": sampled,
        "scratchPeakMemoryBytes": int(memory.get("used_memory_peak", 0)),
        "seconds": round(time.monotonic() - started, 1),
    }


def main(*, env: Mapping[str, str] | None = None) -> int:
    """``runbook-operator restore-redis``: exit 0 with a one-line JSON summary (also the termination message),
    or 1 with ``restore failed: <Reason>: <message>`` as the last line of stderr."""
    environment = os.environ if env is None else env
    for name in (*SECRET_ENVS, REDIS_PASSWORD_ENV):
        REDACTOR.register(environment.get(name))
    try:
        summary = restore_redis(read_plan(environment, RESTORE_PLAN_ENV, RedisRestorePlan), environment)
    except RunbookError as error:
        print(f"restore failed: {error.reason}: {REDACTOR.scrub(error.message)}", file=sys.stderr, flush=True)
        return 1
    line = json.dumps({"restore": "complete", "redis": summary}, separators=(",", ":"))
    report(line)
    print(line, flush=True)
    return 0
