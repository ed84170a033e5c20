"""Fixtures of the e2e tier: pods that really run, once for the whole tier.

One local cluster with its real node (tools/localcluster ``real_node=True``) for the package: the images
(tools/image/image.py: the operator's, PostgreSQL 15, Redis 7.0, moto's S3 server; cached, built when stale)
are imported into the node, ``kubectl apply -k deploy/overlays/e2e/`` installs the operator as pods of its own
image with its ServiceAccount and RBAC, and ``kubectl apply -k deploy/dev/platform/`` the runbook's
namespace. The scope is the package, not the session: the machine has one real node, and
tests/integration/test_real_node.py starts its own after this tier stopped this one.

A missing piece (Docker, the node's host packages, an image build, a pod that never gets Ready) fails the
tests with the reason; nothing is skipped. A real node that another run on this machine holds is waited for
(up to NODE_WAIT s), never stopped from here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from tests.e2e.support import (
    BACKUP_BUCKET,
    E2E,
    EVIDENCE_BUCKET,
    GROUP,
    NAMESPACE,
    OPERATOR_NAMESPACE,
    OVERLAY,
    PLATFORM,
    S3_ENDPOINT,
    STORAGE_NAMESPACE,
    VERSION,
    image_tool,
    localcluster,
)
from tests.services import CertificateAuthority, GpgKeyring

NODE_WAIT = 1200.0
READY_TIMEOUT = 300.0  # pods on a loaded 2-core machine: the operator's Python start alone takes ~20 s


def start_real_node(state_dir: Path) -> localcluster.LocalCluster:
    """Start the cluster with its real node, waiting while another run on this machine holds the node."""
    deadline = time.monotonic() + NODE_WAIT
    while True:
        # The owner file names the node's state dir; a kubelet of ours running means a node is starting or
        # running whose owner file may not be written yet (or was removed by a colliding run).
        owner = localcluster.node_owner()
        kubelets = localcluster.pids_mentioning(str(localcluster.node_bin_dir() / "kubelet"))
        if owner is None and not kubelets:
            try:
                cluster = localcluster.LocalCluster(state_dir, real_node=True)
                cluster.start()
                return cluster
            except localcluster.LocalClusterError as error:
                if "a real node already runs" not in str(error):  # another run took it meanwhile: wait again
                    raise
        if time.monotonic() > deadline:
            raise localcluster.LocalClusterError(
                f"the machine's real node stayed in use by {owner or 'another run'} for {NODE_WAIT:.0f}s: "
                "stop that cluster (python tools/localcluster/localcluster.py stop --state-dir DIR)"
            )
        localcluster.log(f"the real node is in use by {owner or 'another run'}; waiting for it")
        time.sleep(10)


@pytest.fixture(scope="package")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The platform Redis's TLS material, made for each run (no key is ever in the repository): a development
    CA and one certificate for the Redis Service's names that the server presents and clients present too, as
    ca.crt, tls.crt and tls.key in the returned directory: the keys of the Secret redis-tls."""
    authority = CertificateAuthority(tmp_path_factory.mktemp("redis-tls"), name="runbook e2e CA")
    dns = (f"redis.{NAMESPACE}.svc", f"redis.{NAMESPACE}.svc.cluster.local", "redis")
    authority.issue("tls", dns=dns, usage="both")
    return authority.directory


def redis_tls_secret(directory: Path) -> dict[str, object]:
    """The Secret redis-tls (kubernetes.io/tls with the CA beside it), as tools/dev/prerequisites.sh makes it."""
    files = ("ca.crt", "tls.crt", "tls.key")
    return {
        "metadata": {"name": "redis-tls"},
        "type": "kubernetes.io/tls",
        "stringData": {name: (directory / name).read_text() for name in files},
    }


def gpg_objects(e2e: E2E, keyring: GpgKeyring) -> None:
    """The security team's public key for the policies, and its private key for the restore."""
    private = keyring.run("--armor", "--export-secret-keys", keyring.email).stdout.decode()
    e2e.core.create_namespaced_config_map(
        NAMESPACE,
        {"metadata": {"name": "backup-gpg-recipients"}, "data": {"security-team.asc": keyring.public_key}},
    )
    e2e.core.create_namespaced_secret(
        NAMESPACE,
        {"metadata": {"name": "restore-gpg-private-key"}, "stringData": {"security-team-private.asc": private}},
    )


def grant(e2e: E2E) -> None:
    """The administrator's RunbookGrant: the storage namespace's S3 server's two buckets, plaintext."""
    e2e.custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "runbookgrants",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RunbookGrant",
            "metadata": {"name": NAMESPACE},
            "spec": {
                "namespaces": [NAMESPACE],
                "s3": [{"endpoint": S3_ENDPOINT, "buckets": [BACKUP_BUCKET, EVIDENCE_BUCKET]}],
                "plaintextConnections": True,
            },
        },
    )


def wait_platform(e2e: E2E) -> None:
    def workloads_ready() -> bool:
        apps = e2e.apps
        deployments = [apps.read_namespaced_deployment(n, NAMESPACE) for n in ("api", "backend")]
        deployments.append(apps.read_namespaced_deployment("s3", STORAGE_NAMESPACE))
        sets = [apps.read_namespaced_stateful_set(n, NAMESPACE) for n in ("postgresql", "redis")]
        jobs = [e2e.batch.read_namespaced_job("postgresql-init", NAMESPACE)]
        return (
            all((w.status.ready_replicas or 0) == w.spec.replicas for w in [*deployments, *sets])
            and all((j.status.succeeded or 0) >= 1 for j in jobs)
            and len(e2e.ready_pods("app=api")) == 2  # no terminating leftovers
        )

    e2e.wait(workloads_ready, timeout=READY_TIMEOUT, what="the platform's pods Ready and its Jobs done")

    def operator_ready() -> bool:
        deployment = e2e.apps.read_namespaced_deployment("runbook-operator", OPERATOR_NAMESPACE)
        return bool((deployment.status.ready_replicas or 0) == deployment.spec.replicas)

    e2e.wait(operator_ready, timeout=READY_TIMEOUT, what="the operator's pods Ready", namespace=OPERATOR_NAMESPACE)


@pytest.fixture(scope="package")
def e2e(tmp_path_factory: pytest.TempPathFactory, gpg_keyring: GpgKeyring, redis_tls: Path) -> Iterator[E2E]:
    timings: dict[str, float] = {}
    started = time.monotonic()
    tars = [image_tool.build_operator(), *image_tool.build_e2e().values()]
    timings["images (build or cache check)"] = time.monotonic() - started

    started = time.monotonic()
    cluster = start_real_node(tmp_path_factory.mktemp("e2e-cluster"))
    timings["real node start"] = time.monotonic() - started
    try:
        started = time.monotonic()
        for tar in tars:
            cluster.import_image(tar)
        timings["image import"] = time.monotonic() - started

        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(cluster.kubeconfig), client_configuration=config)
        e2e = E2E(cluster, kubernetes.client.ApiClient(config), timings)

        started = time.monotonic()
        # The namespace (the platform's) before the operator's RoleBindings in it; CRDs before the grant.
        e2e.must("apply", "-k", str(PLATFORM))
        # What `make run` gets from prerequisites.sh right after the platform: its Redis waits for it.
        e2e.core.create_namespaced_secret(NAMESPACE, redis_tls_secret(redis_tls))
        e2e.must("apply", "--server-side", "-k", str(OVERLAY))
        e2e.must("wait", "--for=condition=Established", "crd", "--all", "--timeout=120s")
        grant(e2e)
        gpg_objects(e2e, gpg_keyring)
        wait_platform(e2e)
        timings["install (operator + platform Ready)"] = time.monotonic() - started
        yield e2e
        for what, seconds in timings.items():
            print(f"[e2e] {what}: {seconds:.1f}s")
    finally:
        cluster.stop()
