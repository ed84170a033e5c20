"""BackupRestore of Redis backups against the real API server, a real redis-server (the target and the Job's
scratch server), gpg and the S3 API server, on backups made by the BackupPolicy agent. As in test_restore, the
Job's pod is run as a process with the pod's arguments and resolved environment; its memory-backed scratch
volume is a directory under /dev/shm."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import pytest
import redis
from tests.backup_support import agent_env, manifest_of, new_bucket, policy_spec, run_agent
from tests.integration.conftest import grant
from tests.integration.test_restore import WORKLOADS, Cluster
from tests.restore_support import (
    OWNER,
    OWNER_PASSWORD,
    SIGNED,
    create_shop,
    fingerprint,
    make_backup,
    private_key,
)
from tests.services import GpgKeyring, Postgres, Redis, S3Server

from runbook_operator.builders.restore import DRILL_LABEL, REPLICAS_ANNOTATION, job_name
from runbook_operator.models.plans import REDIS_PASSWORD_ENV

pytestmark = pytest.mark.integration

GROUP, VERSION = "runbook.dev", "v1alpha1"
POLICY = "cache"
PRIVATE_KEY_SECRET = "restore-gpg-private"
SCRATCH_ENV = "RUNBOOK_SCRATCH_DIR"
KEYS_PER_DB = 50_000
# Per db: what each kind of key holds; 1 in 5 of each kind gets a TTL of 1 to 2 hours.
KINDS = {"string": 30_000, "hash": 5_000, "list": 5_000, "set": 4_000, "zset": 4_000, "stream": 2_000}
SAMPLE_EVERY = 25  # 4000 keys of 100k compared value by value (and every key with a TTL by its TTL)


def fill(server: Redis, db: int) -> None:
    """KEYS_PER_DB keys of every type in ``db``, some with TTLs."""
    assert sum(KINDS.values()) == KEYS_PER_DB
    pipe = server.client(db=db).pipeline(transaction=False)
    for kind, count in KINDS.items():
        for i in range(count):
            key = f"db{db}:{kind}:{i}"
            if kind == "string":
                pipe.set(key, f"value-{db}-{i}-" + "x" * (i % 64))
            elif kind == "hash":
                pipe.hset(key, mapping={"user": f"u{i}", "visits": str(i * 7), "db": str(db)})
            elif kind == "list":
                pipe.rpush(key, *[f"item-{i}-{n}" for n in range(1 + i % 8)])
            elif kind == "set":
                pipe.sadd(key, *[f"member-{n}" for n in range(1 + i % 6)])
            elif kind == "zset":
                pipe.zadd(key, {f"player-{n}": n * 1.5 + i for n in range(1 + i % 5)})
            else:
                for n in range(1 + i % 3):
                    pipe.xadd(key, {"event": f"e{n}", "i": str(i)}, id=f"{1700000000000 + i}-{n}")
            if i % 5 == 0:
                pipe.pexpire(key, 3_600_000 + i * 50)
            if len(pipe) >= 5000:
                pipe.execute()
        pipe.execute()


def value_of(client: redis.Redis, key: bytes) -> Any:
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
    raise AssertionError(f"unexpected type {kind!r} of {key!r}")


def snapshot(server: Redis) -> dict[int, dict[bytes, tuple[Any, float | None]]]:
    """Every SAMPLE_EVERY-th key and every key with a TTL, per db: (value, absolute expiry in ms or None)."""
    taken: dict[int, dict[bytes, tuple[Any, float | None]]] = {}
    for db in (0, 1):
        client = server.client(db=db)
        taken[db] = {}
        for index, key in enumerate(sorted(client.scan_iter(count=1000))):
            ttl = client.pttl(key)
            if index % SAMPLE_EVERY == 0 or ttl > 0:
                taken[db][key] = (value_of(client, key), time.time() * 1000 + ttl if ttl > 0 else None)
    return taken


def assert_as_snapshot(server: Redis, taken: dict[int, dict[bytes, tuple[Any, float | None]]]) -> None:
    for db, keys in taken.items():
        client = server.client(db=db)
        for key, (value, expiry) in keys.items():
            assert value_of(client, key) == value, (db, key)
            ttl = client.pttl(key)
            if expiry is None:
                assert ttl == -1, (db, key, ttl)
            else:
                assert abs(time.time() * 1000 + ttl - expiry) < 1000, (db, key, ttl)


def keyspace(server: Redis) -> dict[str, int]:
    return {db: int(stats["keys"]) for db, stats in server.client().info("keyspace").items()}


@pytest.fixture
def cluster(
    api: kubernetes.client.ApiClient, namespace: str, crds_installed: list[str], wait_for: Any
) -> Iterator[Cluster]:
    made = Cluster(api, namespace, wait_for)
    made.signing_key()
    with made.verify_pods():
        yield made


@pytest.fixture
def cache(tmp_path: Path, api: kubernetes.client.ApiClient, namespace: str) -> Iterator[Redis]:
    """The runbook's Redis for one test (its own server: the restore flushes it), granted to the namespace."""
    with Redis(tmp_path / "cache") as server:
        grant(api, namespace, hosts=[(server.host, server.port)])
        yield server


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """The Job pod's memory-backed scratch volume."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="restore-scratch-") as directory:
        yield Path(directory)


def redis_source(server: Redis) -> dict[str, Any]:
    return {
        "redis": {
            "host": server.host,
            "port": server.port,
            "passwordSecretRef": {"name": "redis-credentials", "key": "password"},
            "insecurePlaintext": True,
        }
    }


def common_objects(cluster: Cluster, s3: S3Server, keyring: GpgKeyring) -> None:
    cluster.secret(
        "backup-s3-credentials", {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    )
    cluster.core.create_namespaced_config_map(
        cluster.namespace,
        {"metadata": {"name": "backup-gpg-recipients"}, "data": {"team.asc": keyring.public_key}},
    )
    cluster.secret(PRIVATE_KEY_SECRET, {"private.asc": private_key(keyring)})


def redis_backup(cluster: Cluster, server: Redis, s3: S3Server, keyring: GpgKeyring) -> dict[str, Any]:
    """A backup of ``server`` by the BackupPolicy agent, and the policy it belongs to; returns the manifest."""
    bucket = new_bucket(s3)
    spec = policy_spec(redis_source(server), s3, bucket)
    result = run_agent(
        agent_env(spec, s3, keyring, **{REDIS_PASSWORD_ENV: server.password}, **SIGNED),
        namespace=cluster.namespace,
        policy=POLICY,
    )
    assert result.returncode == 0, result.stderr
    cluster.secret("redis-credentials", {"password": server.password})
    cluster.create("backuppolicies", POLICY, spec)
    return manifest_of(s3, bucket)


def restore_spec(**extra: Any) -> dict[str, Any]:
    return {
        "policyRef": POLICY,
        "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
        "scaleDown": [{"kind": "Deployment", "name": name} for name in WORKLOADS],
        **extra,
    }


def step_names(obj: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["name"], s["phase"]) for s in obj["status"]["steps"]]


def test_redis_round_trip_of_100k_keys_through_backup_restore(
    cluster: Cluster,
    cache: Redis,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    scratch_dir: Path,
    operator_runner: kopf.testing.KopfRunner,
) -> None:
    fill(cache, 0)
    fill(cache, 1)
    taken = snapshot(cache)
    assert sum(len(keys) for keys in taken.values()) > 2 * KEYS_PER_DB // SAMPLE_EVERY
    common_objects(cluster, s3_server, gpg_keyring)
    manifest = redis_backup(cluster, cache, s3_server, gpg_keyring)
    assert manifest["source"]["keyspace"] == {"db0": KEYS_PER_DB, "db1": KEYS_PER_DB}
    cluster.create_workloads()

    # The incident: everything flushed, and keys that were not in the backup written meanwhile.
    cache.client().flushall()
    cache.client(db=0).set("written-after-the-backup", "must go")
    cache.client(db=3).set("db3-after-the-backup", "must go")

    cluster.create("backuprestores", "rollback", restore_spec())
    started = cluster.wait_phase("rollback", "Restoring", "Failed", timeout=120)
    assert started["status"]["phase"] == "Restoring", started["status"]
    cluster.wait_for(lambda: cluster.restore("rollback").get("status", {}).get("jobName"), what="the Job")
    status = cluster.restore("rollback")["status"]
    assert status["phase"] == "Restoring"
    assert status["scaledDown"] == [{"kind": "Deployment", "name": n, "replicas": r} for n, r in WORKLOADS.items()]
    assert cluster.replicas() == {"api": 0, "backend": 0}
    assert keyspace(cache) == {"db0": 1, "db3": 1}  # preflight changed nothing
    job = cluster.batch.read_namespaced_job(job_name("rollback"), cluster.namespace)
    pod = job.spec.template.spec
    scratch = next(v for v in pod.volumes if v.name == "scratch")
    assert scratch.empty_dir.medium == "Memory"  # the decrypted RDB never reaches a disk

    started = time.monotonic()
    result = cluster.run_job_pod(job_name("rollback"), **{SCRATCH_ENV: str(scratch_dir)})
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert cache.password not in result.stdout + result.stderr
    assert list(scratch_dir.iterdir()) == []  # the plaintext RDB is gone from the scratch volume too
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\n100k-key Redis restore: {seconds:.1f} s, agent summary {summary}")
    done = cluster.wait_phase("rollback", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", done["status"]

    assert keyspace(cache) == {"db0": KEYS_PER_DB, "db1": KEYS_PER_DB}
    assert keyspace(cache) == {db: n for db, n in manifest["source"]["keyspace"].items()}
    assert_as_snapshot(cache, taken)
    assert cluster.replicas() == WORKLOADS and cluster.all_available()
    assert all(REPLICAS_ANNOTATION not in a for a in cluster.annotations().values())
    assert step_names(done) == [
        ("Preflight", "Succeeded"),
        ("ScaleDown", "Succeeded"),
        ("Restore", "Succeeded"),
        ("Check", "Succeeded"),
        ("ScaleUp", "Succeeded"),
    ]
    checks = done["status"]["checks"]
    assert checks["sha256"] == manifest["data"]["sha256"]
    assert checks["keyspace"] == {"db0": KEYS_PER_DB, "db1": KEYS_PER_DB}
    assert checks["sampledKeys"] >= 1000
    ready = cluster.condition(done, "Ready")
    assert ready["reason"] == "Restored" and "100000 keys" in ready["message"], ready
    texts = [json.dumps(done)] + [f"{e.reason} {e.message}" for e in cluster.events("rollback")]
    assert all(cache.password not in text for text in texts)


def test_restore_into_a_target_of_the_other_kind_is_refused_in_preflight(
    cluster: Cluster,
    cache: Redis,
    postgres: Postgres,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    operator_runner: kopf.testing.KopfRunner,
) -> None:
    cache.client().mset({f"session:{i}": i for i in range(500)})
    common_objects(cluster, s3_server, gpg_keyring)
    redis_backup(cluster, cache, s3_server, gpg_keyring)
    shop = create_shop(postgres)
    pg = make_backup(postgres, shop, s3_server, gpg_keyring, namespace=cluster.namespace, policy="db", **SIGNED)
    cluster.secret("db-credentials", {"username": OWNER, "password": OWNER_PASSWORD})
    cluster.create("backuppolicies", "db", pg.spec)
    cluster.create_workloads()
    cache.client().set("after-the-backup", "kept")
    before_redis, before_pg = keyspace(cache), fingerprint(postgres, shop)
    cases = {
        # A Redis backup into a PostgreSQL database.
        "redis-into-postgresql": (
            restore_spec(target={"host": postgres.host, "port": postgres.port, "database": shop}),
            "spec.target.database",
        ),
        # A PostgreSQL backup into a Redis server.
        "postgresql-into-redis": (
            restore_spec(policyRef="db", target={"redis": {"host": cache.host, "port": cache.port}}),
            "spec.target.redis",
        ),
    }
    for name, (spec, _) in cases.items():
        cluster.create("backuprestores", name, spec)
    for name, (_, field) in cases.items():
        done = cluster.wait_phase(name, "Failed")
        ready = cluster.condition(done, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "TargetMismatch"), (name, ready)
        assert field in ready["message"], (name, ready)
        assert step_names(done) == [("Preflight", "Failed")]
        assert "jobName" not in done["status"]
        cluster.wait_for(
            lambda name=name: "TargetMismatch" in [e.reason for e in cluster.events(name)],
            timeout=15,
            what="the TargetMismatch Event",
        )
    assert cluster.batch.list_namespaced_job(cluster.namespace).items == []
    assert cluster.replicas() == WORKLOADS
    assert keyspace(cache) == before_redis and fingerprint(postgres, shop) == before_pg


def test_redis_drill_restores_into_a_scratch_redis_and_sets_verified(
    cluster: Cluster,
    cache: Redis,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    scratch_dir: Path,
    tmp_path: Path,
    operator_runner: kopf.testing.KopfRunner,
) -> None:
    cache.client().mset({f"session:{i}": i for i in range(1500)})
    cache.client(db=1).hset("config", mapping={"mode": "strict"})
    common_objects(cluster, s3_server, gpg_keyring)
    redis_backup(cluster, cache, s3_server, gpg_keyring)
    cluster.create_workloads()
    with pytest.raises(kubernetes.client.ApiException) as info:  # never a drill into the source itself
        cluster.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            cluster.namespace,
            "backuppolicies",
            POLICY,
            {"spec": {"verification": {"schedule": "0 4 * * 0", "target": {"redis": {"port": cache.port}}}}},
        )
    assert "must name a scratch" in info.value.body
    with Redis(tmp_path / "scratch-redis") as drill_target:
        grant(cluster.api, cluster.namespace, hosts=[(drill_target.host, drill_target.port)])
        drill_target.client().set("left-over", "from the last drill")
        verification = {
            "schedule": "* * * * *",
            "target": {"redis": {"port": drill_target.port}},
            "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
        }
        cluster.secret("scratch-redis", {"password": drill_target.password})
        verification["target"]["redis"]["passwordSecretRef"] = {"name": "scratch-redis", "key": "password"}
        cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, "backuppolicies", POLICY, {"spec": {"verification": verification}}
        )

        def drill() -> str | None:
            items = cluster.custom.list_namespaced_custom_object(
                GROUP, VERSION, cluster.namespace, "backuprestores", label_selector=f"{DRILL_LABEL}={POLICY}"
            )["items"]
            return items[0]["metadata"]["name"] if items else None

        name = cluster.wait_for(drill, timeout=90, what="a drill to be created")
        cluster.wait_for(lambda: cluster.restore(name).get("status", {}).get("jobName"), what="the drill's Job")
        assert cluster.replicas() == WORKLOADS  # a drill stops nothing
        result = cluster.run_job_pod(job_name(name), **{SCRATCH_ENV: str(scratch_dir)})
        assert result.returncode == 0, result.stderr
        done = cluster.wait_phase(name, "Succeeded", "Failed")
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert keyspace(drill_target) == {"db0": 1500, "db1": 1}
        assert drill_target.client(db=1).hgetall("config") == {b"mode": b"strict"}
        assert keyspace(cache) == {"db0": 1500, "db1": 1}  # the source was not touched

        def verified() -> dict[str, Any] | None:
            policy = cluster.get("backuppolicies", POLICY)
            return policy if cluster.condition(policy, "Verified").get("status") == "True" else None

        policy = cluster.wait_for(verified, timeout=30, what="Verified on the policy")
        assert policy["status"]["lastVerifiedBackup"]["keys"] == 1501
        assert "1501 keys" in cluster.condition(policy, "Verified")["message"]


def test_a_redis_drill_onto_the_source_under_another_name_is_refused(
    cluster: Cluster,
    cache: Redis,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    api: kubernetes.client.ApiClient,
    operator_runner: kopf.testing.KopfRunner,
) -> None:
    """``localhost`` passes the API server's string comparison with the source's ``127.0.0.1``, but it is the
    same server (the same address, the same run_id): the drill fails its preflight with TargetIsSource naming
    spec.verification.target, and the source is not flushed."""
    grant(api, cluster.namespace, hosts=[(cache.host, cache.port), ("localhost", cache.port)])
    cache.client().mset({f"session:{i}": i for i in range(50)})
    common_objects(cluster, s3_server, gpg_keyring)
    redis_backup(cluster, cache, s3_server, gpg_keyring)
    cache.client().set("written-after-the-backup", "kept")
    cluster.create_workloads()
    verification = {
        "schedule": "* * * * *",
        "target": {"redis": {"host": "localhost"}},
        "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
    }
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, "backuppolicies", POLICY, {"spec": {"verification": verification}}
    )

    def drill() -> str | None:
        items = cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, "backuprestores", label_selector=f"{DRILL_LABEL}={POLICY}"
        )["items"]
        return items[0]["metadata"]["name"] if items else None

    name = cluster.wait_for(drill, timeout=90, what="a drill to be created")
    done = cluster.wait_phase(name, "Failed", "Succeeded", "Restoring")
    ready = cluster.condition(done, "Ready")
    assert (done["status"]["phase"], ready["reason"]) == ("Failed", "TargetIsSource"), done["status"]
    assert ready["message"].startswith(
        f"BackupPolicy {POLICY} spec.verification.target: localhost:{cache.port} is the source "
        f"{cache.host}:{cache.port} (both reach 127.0.0.1:{cache.port})"
    ), ready
    assert "jobName" not in done["status"]
    assert keyspace(cache) == {"db0": 51} and cache.client().get("written-after-the-backup") == b"kept"
