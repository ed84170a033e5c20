"""The operator runs as pods of its own image, and an EmergencyIsolation stops real packets.

A client pod in the runbook's namespace connects to an ``api`` pod's port (``nettool connect``, a 3 s dial)
before the isolation, times out once ``emergency-isolate`` exists (the policy's packets are dropped), resolves DNS
(CoreDNS, a kube-system pod behind kube-dns) only with ``allowDNS``, and connects again after the release. The
negative control first shows that this check fails when an ``emergency-isolate`` lets traffic through.
"""

from __future__ import annotations

import io
import re
import tarfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.support import (
    APP_PORT,
    E2E,
    EVIDENCE_BUCKET,
    GROUP,
    NAMESPACE,
    OPERATOR_NAMESPACE,
    S3_ENDPOINT,
    VERSION,
    image_tool,
    run_pod,
    s3_client,
)
from tests.services import GpgKeyring

pytestmark = pytest.mark.integration

# What Go's dialer says when nothing answers within nettool's 3 s; a refusal ("connect: connection refused")
# would mean the packets got an answer, as from a server that went away.
BLOCKED = re.compile(rf"dial tcp [0-9.]+:{APP_PORT}: i/o timeout")
SETTLE = 45.0  # kube-router syncs a policy within seconds; the machine is loaded


def test_the_operator_runs_as_pods_of_its_image_on_the_real_node(e2e: E2E) -> None:
    pods = e2e.ready_pods("app.kubernetes.io/name=runbook-operator", namespace=OPERATOR_NAMESPACE)
    assert len(pods) == 2, [p.metadata.name for p in pods]
    for pod in pods:
        assert pod.spec.node_name == "real-node"
        assert pod.spec.service_account_name == "runbook-operator"
        (status,) = pod.status.container_statuses
        assert status.image.endswith(image_tool.operator_image().split("/", 1)[1]), status.image
        assert status.state.running is not None and status.container_id.startswith("containerd://")
    lease = e2e.kubectl(
        "-n", OPERATOR_NAMESPACE, "get", "lease", "runbook-operator", "-o", "jsonpath={.spec.holderIdentity}"
    )
    assert lease.stdout.split("_")[0] in {p.metadata.name for p in pods}, lease  # kopf's <pod>_<suffix>


def connect(e2e: E2E, client: str, ip: str) -> tuple[int, str]:
    result = e2e.exec_in(client, "/nettool", "connect", ip, str(APP_PORT))
    return result.returncode, (result.stdout + result.stderr).strip()


def lookup(e2e: E2E, client: str, name: str) -> tuple[int, str]:
    result = e2e.exec_in(client, "/nettool", "lookup", name)
    return result.returncode, (result.stdout + result.stderr).strip()


def assert_connection_blocked(e2e: E2E, client: str, server: Any) -> str:
    """The isolation's check: within SETTLE s a connection from ``client`` to the ``server`` pod's port fails, and
    keeps failing, while the server still runs and listens (its kubelet's readiness probe, from the node, still
    passes): the policy stopped the packets, not a server that went away. The connection times out ("i/o
    timeout"), as with a policy implementation that drops (Calico, Cilium): kube-router rejects, and the local
    node drops the ICMP port-unreachable of its rejection (localcluster's RUNBOOK-LOCALCLUSTER-REJECTS).
    Raises AssertionError otherwise."""
    ip = server.status.pod_ip
    deadline = time.monotonic() + SETTLE
    code, output = connect(e2e, client, ip)
    while code == 0 and time.monotonic() < deadline:
        code, output = connect(e2e, client, ip)
    assert code != 0 and BLOCKED.search(output), f"{client} -> {ip}:{APP_PORT} still answered: {output}"
    again = connect(e2e, client, ip)
    assert again[0] != 0 and BLOCKED.search(again[1]), f"{client} -> {ip}:{APP_PORT} answered again: {again}"
    now = e2e.core.read_namespaced_pod(server.metadata.name, NAMESPACE)
    assert now.status.pod_ip == ip and any(c.type == "Ready" and c.status == "True" for c in now.status.conditions)
    restarts = now.status.container_statuses[0].restart_count
    assert restarts == server.status.container_statuses[0].restart_count, "the server restarted meanwhile"
    return output


def api_pod(e2e: E2E) -> Any:
    pods = e2e.ready_pods("app=api")
    assert pods, e2e.diagnostics()
    return pods[0]


def isolation(name: str, *, evidence: bool) -> dict[str, Any]:
    """An EmergencyIsolation of the namespace's network (no scaling: the api pod must stay to be unreachable)."""
    spec: dict[str, Any] = {
        "reason": "e2e: suspected exfiltration through api",
        "incidentId": "INC-E2E-1",
        "severity": "P1",
        "network": {"isolate": True, "allowDNS": False, "overrideExistingPolicies": True},
        "scaleToZero": {"enabled": False},
        "evidence": {"capture": False, "required": False},
    }
    if evidence:
        spec["evidence"] = {
            "capture": True,
            "required": True,
            "destination": {
                "bucket": EVIDENCE_BUCKET,
                "prefix": "incidents",
                "endpoint": S3_ENDPOINT,
                "region": "us-east-1",
                "credentialsSecretRef": {"name": "backup-s3-credentials"},
            },
            "encryption": {
                "gpg": {"recipientsConfigMapRef": {"name": "backup-gpg-recipients", "key": "security-team.asc"}}
            },
        }
    return {"kind": "EmergencyIsolation", "metadata": {"name": name}, "spec": spec}


def policy_names(e2e: E2E) -> set[str]:
    return {p.metadata.name for p in e2e.networking.list_namespaced_network_policy(NAMESPACE).items}


def patch_isolation(e2e: E2E, name: str, spec: dict[str, Any]) -> None:
    e2e.custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "emergencyisolations", name, {"spec": spec})


@pytest.fixture
def client(e2e: E2E) -> Iterator[str]:
    """A client pod in the isolated namespace; afterwards no isolation or emergency-isolate is left behind."""
    name = run_pod(e2e, f"isolation-client-{uuid.uuid4().hex[:6]}", ["serve", "9999"]).metadata.name
    yield name
    e2e.core.delete_namespaced_pod(name, NAMESPACE)
    for item in e2e.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "emergencyisolations")["items"]:
        e2e.custom.delete_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "emergencyisolations", item["metadata"]["name"]
        )
    if "emergency-isolate" in policy_names(e2e):
        e2e.networking.delete_namespaced_network_policy("emergency-isolate", NAMESPACE)
    e2e.wait(
        lambda: (
            not e2e.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "emergencyisolations")["items"]
            and "emergency-isolate" not in policy_names(e2e)
        ),
        timeout=120,
        what="the isolations gone",
    )


def test_an_isolation_stops_real_traffic_and_its_release_lets_it_through(
    e2e: E2E, gpg_keyring: GpgKeyring, client: str
) -> None:
    server = api_pod(e2e)
    ip = server.status.pod_ip
    assert connect(e2e, client, ip) == (0, f"ok from {server.metadata.name}")
    assert lookup(e2e, client, "api")[0] == 0

    # Negative control: an emergency-isolate whose rules let everything through must fail the check.
    leaky = {
        "metadata": {"name": "emergency-isolate"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]},
    }
    e2e.networking.create_namespaced_network_policy(NAMESPACE, leaky)
    with pytest.raises(AssertionError, match="still answered"):
        assert_connection_blocked(e2e, client, server)
    e2e.networking.delete_namespaced_network_policy("emergency-isolate", NAMESPACE)
    e2e.wait(lambda: connect(e2e, client, ip)[0] == 0, timeout=SETTLE, what="the control policy gone")

    e2e.create_custom("emergencyisolations", isolation("e2e-breach", evidence=True))
    e2e.wait(lambda: "emergency-isolate" in policy_names(e2e), timeout=120, what="the operator's emergency-isolate")
    assert_connection_blocked(e2e, client, server)
    code, output = lookup(e2e, client, "api")
    assert code != 0 and "i/o timeout" in output, f"DNS without allowDNS: {output}"

    evidence = e2e.wait(
        lambda: (e2e.custom_object("emergencyisolations", "e2e-breach").get("status") or {}).get("evidence"),
        timeout=180,
        what="the isolation's evidence",
    )
    archive = gpg_keyring.decrypt(s3_client(e2e).get_object(Bucket=EVIDENCE_BUCKET, Key=evidence["key"])["Body"].read())
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        api_log = tar.extractfile(f"logs/{server.metadata.name}/api.log")
        assert api_log is not None
        text = api_log.read().decode()
    client_ip = e2e.core.read_namespaced_pod(client, NAMESPACE).status.pod_ip
    assert f"serving on [::]:{APP_PORT}" in text and f"connection from {client_ip}:" in text, text

    patch_isolation(e2e, "e2e-breach", {"released": True})
    e2e.wait(
        lambda: connect(e2e, client, ip) == (0, f"ok from {server.metadata.name}"),
        timeout=120,
        what="the api port reachable after the release",
    )
    assert "emergency-isolate" not in policy_names(e2e)


def test_allow_dns_lets_lookups_through_an_isolation(e2e: E2E, client: str) -> None:
    """allowDNS opens egress to kube-system's pods on port 53, where the local cluster's CoreDNS runs as in a real
    cluster: lookups time out under the isolation, resolve once allowDNS is set, and the api port stays closed."""
    server = api_pod(e2e)
    assert lookup(e2e, client, "api")[0] == 0
    e2e.create_custom("emergencyisolations", isolation("e2e-dns", evidence=False))
    e2e.wait(lambda: "emergency-isolate" in policy_names(e2e), timeout=120, what="the operator's emergency-isolate")
    assert_connection_blocked(e2e, client, server)
    code, output = lookup(e2e, client, "api")
    assert code != 0 and "i/o timeout" in output, f"DNS without allowDNS: {output}"

    patch_isolation(e2e, "e2e-dns", {"network": {"allowDNS": True}})
    e2e.wait(
        lambda: any(
            r.get("ports")
            for r in e2e.networking.read_namespaced_network_policy("emergency-isolate", NAMESPACE)
            .to_dict()["spec"]
            .get("egress")
            or []
        ),
        timeout=60,
        what="emergency-isolate's DNS rule",
    )
    deadline = time.monotonic() + SETTLE
    while (result := lookup(e2e, client, "api"))[0] != 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert result[0] == 0, f"no lookup got through with allowDNS: {result[1]}"
    assert result[1] == e2e.core.read_namespaced_service("api", NAMESPACE).spec.cluster_ip, result
    code, output = connect(e2e, client, server.status.pod_ip)  # DNS only: the api port stays closed
    assert code != 0 and BLOCKED.search(output), output
