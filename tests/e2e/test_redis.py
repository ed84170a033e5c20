"""The Redis sample (deploy/samples/backuppolicy-redis.yaml) backs up the platform's Redis on the real node.

The platform Redis (deploy/dev/platform/app/redis.yaml) serves what the runbook describes: TLS only on 6380,
client certificates required, BGSAVE renamed to HIPAA_BGSAVE_i9j0k1l2, a password; the first test checks that
from the host, over the pod's address. The second applies the sample itself (mutual TLS with redis-tls, the
renamed BGSAVE, a symmetric passphrase) with ``runbook.dev/backup-now``: its Job's pod really runs the agent's
``redis-cli --rdb`` against the Redis pod and uploads to the S3 server pod; the object, decrypted by hand with
the passphrase, is an RDB file that holds the key the test SET beforehand, and it loads into a fresh
redis-server. The third: the same policy without the client certificate fails its Job with the reason in
LastBackupSucceeded, lastFailure and a Warning Event, and uploads nothing.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from runbook_operator.builders.backup import POLICY_LABEL
from tests.e2e.support import BACKUP_BUCKET, E2E, NAMESPACE, REPO_ROOT, events_of, s3_client
from tests.services import GpgKeyring, Redis

pytestmark = pytest.mark.integration

SAMPLE = REPO_ROOT / "deploy" / "samples" / "backuppolicy-redis.yaml"
BGSAVE = "HIPAA_BGSAVE_i9j0k1l2"
KEY = "e2e:tls-proof"  # short (< 20 bytes), so the RDB stores it as it is (no LZF compression)
NO_CERT = "redis-no-client-cert"


def secret_value(e2e: E2E, name: str, key: str) -> str:
    return base64.b64decode(e2e.core.read_namespaced_secret(name, NAMESPACE).data[key]).decode()


def redis_ip(e2e: E2E) -> str:
    (pod,) = e2e.ready_pods("app=redis")
    return str(pod.status.pod_ip)


def client(e2e: E2E, pki: Path, *, certificate: bool = True) -> redis.Redis:
    """A client from the host to the Redis pod over TLS (the pod's address: the name is not checked here)."""
    pair = {"ssl_certfile": str(pki / "tls.crt"), "ssl_keyfile": str(pki / "tls.key")} if certificate else {}
    return redis.Redis(
        host=redis_ip(e2e),
        port=6380,
        password=secret_value(e2e, "redis-credentials", "REDIS_PASSWORD"),
        ssl=True,
        ssl_ca_certs=str(pki / "ca.crt"),
        ssl_check_hostname=False,
        socket_timeout=10,
        socket_connect_timeout=10,
        retry=Retry(NoBackoff(), 0),
        **pair,  # type: ignore[arg-type]
    )


def sample_policy(name: str = "redis") -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    assert body["kind"] == "BackupPolicy" and body["metadata"]["namespace"] == NAMESPACE
    body["metadata"] = {"name": name, "annotations": {"runbook.dev/backup-now": f"e2e-{time.time_ns()}"}}
    return body


def policy_jobs(e2e: E2E, policy: str) -> list[Any]:
    jobs = e2e.batch.list_namespaced_job(NAMESPACE, label_selector=f"{POLICY_LABEL}={policy}").items
    return [j for j in jobs if j.metadata.name.startswith(f"backup-{policy}-now-")]


def objects_under(e2e: E2E, prefix: str) -> list[str]:
    listing = s3_client(e2e).list_objects_v2(Bucket=BACKUP_BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


@pytest.fixture(scope="module")
def passphrase(e2e: E2E) -> str:
    """The sample's backup-gpg-passphrase (prerequisites.sh makes one for `make run`)."""
    value = secrets.token_urlsafe(24)
    e2e.core.create_namespaced_secret(
        NAMESPACE, {"metadata": {"name": "backup-gpg-passphrase"}, "stringData": {"passphrase": value}}
    )
    return value


def test_the_platform_redis_serves_only_mutual_tls_on_6380_with_bgsave_renamed(e2e: E2E, redis_tls: Path) -> None:
    (port,) = e2e.core.read_namespaced_service("redis", NAMESPACE).spec.ports
    assert (port.port, port.target_port) == (6380, 6380)
    with pytest.raises(ConnectionRefusedError), socket.create_connection((redis_ip(e2e), 6379), timeout=5):
        pass  # port 0: no plaintext listener
    with pytest.raises(redis.ConnectionError):  # tls-auth-clients yes: the handshake (or the first read) fails
        client(e2e, redis_tls, certificate=False).ping()
    with client(e2e, redis_tls) as tls:
        assert tls.ping()
        with pytest.raises(redis.ResponseError, match="unknown command"):
            tls.execute_command("BGSAVE")  # renamed: only HIPAA_BGSAVE_i9j0k1l2 saves


def test_the_sample_backs_up_the_platform_redis_over_mutual_tls_and_the_rdb_has_the_key(
    e2e: E2E, redis_tls: Path, passphrase: str, gpg_keyring: GpgKeyring, tmp_path: Path
) -> None:
    value = secrets.token_hex(8)
    with client(e2e, redis_tls) as tls:
        tls.set(KEY, value)
        keys = tls.dbsize()

    e2e.create_custom("backuppolicies", sample_policy())
    e2e.wait(
        lambda: (c := e2e.condition("backuppolicies", "redis", "Ready")) and c["status"] == "True",
        timeout=120,
        what="the sample's BackupPolicy Ready",
    )

    def finished_job() -> Any:
        jobs = policy_jobs(e2e, "redis")
        assert not [j for j in jobs if j.status.failed], e2e.diagnostics()
        return next((j for j in jobs if j.status.completion_time), None)

    started = time.monotonic()
    job = e2e.wait(finished_job, timeout=300, what="the Redis backup-now Job to succeed")
    e2e.timings["redis backup-now Job"] = time.monotonic() - started
    (pod,) = e2e.core.list_namespaced_pod(NAMESPACE, label_selector=f"job-name={job.metadata.name}").items
    assert pod.spec.node_name == "real-node"
    (container,) = pod.status.container_statuses
    assert container.state.terminated.exit_code == 0 and container.container_id.startswith("containerd://")

    manifests = [k for k in objects_under(e2e, "redis/") if k.endswith("/manifest.json")]
    assert len(manifests) == 1, manifests
    manifest = json.loads(s3_client(e2e).get_object(Bucket=BACKUP_BUCKET, Key=manifests[0])["Body"].read())
    assert manifest["job"] == job.metadata.name
    source = manifest["source"]
    assert (source["host"], source["port"]) == (f"redis.{NAMESPACE}.svc", 6380), source
    assert source["serverVersion"].startswith("7.0."), source
    assert source["keyspace"] == {"db0": keys}, source

    # By hand: download, check the digest, gpg --decrypt with the passphrase, and the RDB file itself.
    data = s3_client(e2e).get_object(Bucket=BACKUP_BUCKET, Key=manifest["data"]["key"])["Body"].read()
    assert manifest["data"]["key"].endswith("/redis.rdb.gpg")
    assert hashlib.sha256(data).hexdigest() == manifest["data"]["sha256"]
    rdb = gpg_keyring.decrypt(data, passphrase=passphrase)
    assert rdb.startswith(b"REDIS"), rdb[:16]
    assert KEY.encode() in rdb and value.encode() in rdb
    print(f"[e2e] redis backup: {len(data)} bytes encrypted, {len(rdb)} bytes RDB ({manifest['data']['key']})")
    restored = tmp_path / "restored"
    restored.mkdir()
    (restored / "dump.rdb").write_bytes(rdb)
    with Redis(restored) as fresh:
        fresh_client = fresh.client()
        deadline = time.monotonic() + 30
        while fresh_client.info("persistence").get("loading") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fresh_client.get(KEY) == value.encode()

    status = e2e.custom_object("backuppolicies", "redis")["status"]
    assert status["lastSuccessfulBackup"]["job"] == job.metadata.name, status
    assert (e2e.condition("backuppolicies", "redis", "LastBackupSucceeded") or {}).get("status") == "True", status


def test_the_sample_without_the_client_certificate_fails_with_the_reason(e2e: E2E, passphrase: str) -> None:
    body = sample_policy(NO_CERT)
    body["spec"]["source"]["redis"]["tls"].pop("clientCertificateSecretRef")
    body["spec"]["backoffLimit"] = 0  # one pod is enough to see it fail
    e2e.create_custom("backuppolicies", copy.deepcopy(body))

    def failed() -> Any:
        condition = e2e.condition("backuppolicies", NO_CERT, "LastBackupSucceeded")
        return condition if condition and condition["status"] == "False" else None

    condition = e2e.wait(failed, timeout=300, what="LastBackupSucceeded False on the policy without the certificate")
    assert condition["reason"] == "SourceUnavailable", condition
    assert "spec.source.redis.tls.clientCertificateSecretRef" in condition["message"], condition
    assert "requires a client certificate" in condition["message"], condition
    password = secret_value(e2e, "redis-credentials", "REDIS_PASSWORD")
    status = e2e.custom_object("backuppolicies", NO_CERT)["status"]
    assert status["lastFailure"]["reason"] == "SourceUnavailable" and status.get("lastSuccessfulBackup") is None, status
    assert password not in json.dumps(status)
    (job,) = policy_jobs(e2e, NO_CERT)
    assert job.status.failed and not job.status.succeeded
    events = events_of(e2e, NO_CERT)
    assert "BackupFailed" in events and "clientCertificateSecretRef" in events, events
    assert password not in events
    assert objects_under(e2e, f"redis/{NAMESPACE}/{NO_CERT}/") == []
