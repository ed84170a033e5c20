"""kube.LoopCreate (the containment fast path's create on the event loop) against the real API server, as the
operator's ServiceAccount: what it creates, a 409 as False, and refusals as the official client raises them."""

from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes
import pytest

from runbook_operator.clients import kube

pytestmark = pytest.mark.integration


def policy(name: str) -> bytes:
    return json.dumps(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        }
    ).encode()


def test_creates_as_the_operator_answers_a_conflict_and_raises_refusals(
    api: kubernetes.client.ApiClient, operator_kubeconfig: Path, namespace: str
) -> None:
    operator = kubernetes.config.new_client_from_config(config_file=str(operator_kubeconfig))
    forbidden = f"rb-test-closed-{uuid.uuid4().hex[:6]}"  # not enabled: the ServiceAccount may not write there
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": forbidden}})
    executor = ThreadPoolExecutor(max_workers=1)

    async def calls() -> tuple[bool, bool, kubernetes.client.ApiException, kubernetes.client.ApiException]:
        client = kube.LoopCreate(operator)
        try:
            created = await client.create(kube.NETWORK_POLICIES, namespace, policy("held"), executor=executor)
            again = await client.create(kube.NETWORK_POLICIES, namespace, policy("held"), executor=executor)
            with pytest.raises(kubernetes.client.ApiException) as invalid:
                await client.create(kube.NETWORK_POLICIES, namespace, policy("Not_A_Name"), executor=executor)
            with pytest.raises(kubernetes.client.ApiException) as refused:
                await client.create(kube.NETWORK_POLICIES, forbidden, policy("held"), executor=executor)
            return created, again, invalid.value, refused.value
        finally:
            await client.close()

    try:
        created, again, invalid, refused = asyncio.run(calls())
    finally:
        core.delete_namespace(forbidden)
        executor.shutdown()
    assert (created, again) == (True, False)
    stored = kubernetes.client.NetworkingV1Api(api).read_namespaced_network_policy("held", namespace)
    assert stored.spec.policy_types == ["Ingress", "Egress"]
    assert [entry.manager for entry in stored.metadata.managed_fields] == ["runbook-operator"]
    assert invalid.status == 422 and "Not_A_Name" in json.loads(invalid.body)["message"]
    assert refused.status == 403 and "system:serviceaccount:" in json.loads(refused.body)["message"]
