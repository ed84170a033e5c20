"""EmergencyIsolation's transitions against the in-memory Api: isolate, release from the annotations, the
guard. No server; each test is one or two passes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from runbook_operator.builders.isolation import POLICY_NAME, SNAPSHOT_ANNOTATION, saved_policies_name
from runbook_operator.clients import kube
from runbook_operator.reconcilers import isolation
from runbook_operator.reconcilers.interlock import holder_from_index, index_entry
from runbook_operator.reconcilers.runtime import Context, Reconciler, Result, run_pass
from tests.fake_api import FakeApi

NS = "hungryhippaahneties"
ALLOW_ALL = {"podSelector": {}, "ingress": [{}], "egress": [{}], "policyTypes": ["Ingress", "Egress"]}


def namespace(api: FakeApi) -> None:
    """The runbook's namespace in small: a Deployment with an HPA, the database, a CronJob, an allow-all."""
    api.put(kube.DEPLOYMENTS, NS, {"metadata": {"name": "api", "labels": {"app": "api"}}, "spec": {"replicas": 4}})
    api.put(kube.DEPLOYMENTS, NS, {"metadata": {"name": "frontend", "labels": {"app": "web"}}, "spec": {"replicas": 3}})
    api.put(
        kube.STATEFUL_SETS,
        NS,
        {"metadata": {"name": "postgresql", "labels": {"app": "postgresql"}}, "spec": {"replicas": 1}},
    )
    api.put(kube.CRON_JOBS, NS, {"metadata": {"name": "report"}, "spec": {"schedule": "0 3 * * *", "suspend": False}})
    api.put(
        kube.HPAS,
        NS,
        {
            "metadata": {"name": "api"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "api"}, "minReplicas": 2, "maxReplicas": 10},
        },
    )
    api.put(kube.NETWORK_POLICIES, NS, {"metadata": {"name": "allow-all"}, "spec": ALLOW_ALL})


def create(api: FakeApi, name: str = "breach", **network: Any) -> dict[str, Any]:
    spec = {
        "reason": "Suspected exfiltration",
        "incidentId": "INC-2026-0042",
        "network": {"isolate": True, **network},
        "evidence": {"capture": False},
    }
    return api.put(
        isolation.EMERGENCY_ISOLATIONS,
        NS,
        {"apiVersion": "runbook.dev/v1alpha1", "kind": "EmergencyIsolation", "metadata": {"name": name}, "spec": spec},
    )


def run(api: FakeApi, body: dict[str, Any], reconciler: Reconciler[Any, Any] = isolation.ISOLATION) -> Result:
    """One pass, the interlock answered from an index built from what the API holds."""
    stored = [index_entry(b) for (plural, _, _), b in api.objects.items() if plural == "emergencyisolations"]
    ctx = Context.of(reconciler, body, api, isolation=holder_from_index({NS: stored}))
    return run_pass(ctx, reconciler.reconcile)


def fresh(api: FakeApi, name: str = "breach") -> dict[str, Any]:
    found = api.stored(isolation.EMERGENCY_ISOLATIONS, NS, name)
    assert found is not None
    return found


def workload(api: FakeApi, resource: kube.Resource, name: str) -> dict[str, Any]:
    found = api.stored(resource, NS, name)
    assert found is not None
    return found


def release(api: FakeApi, name: str = "breach") -> Result:
    api.patch(isolation.EMERGENCY_ISOLATIONS, NS, name, {"spec": {"released": True}})
    return run(api, fresh(api, name))


def isolated(api: FakeApi, **network: Any) -> dict[str, Any]:
    namespace(api)
    create(api, **network)
    assert run(api, fresh(api)) == Result.done()
    return fresh(api)


def test_isolate_creates_the_policy_and_scales_to_zero_recording_the_snapshot() -> None:
    api = FakeApi()
    body = isolated(api, overrideExistingPolicies=True)

    assert body["status"]["phase"] == "Isolated"
    assert set(p for (plural, _, p) in api.objects if plural == "networkpolicies") == {POLICY_NAME}
    policy = workload(api, kube.NETWORK_POLICIES, POLICY_NAME)
    assert policy["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert policy["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    # the removed policy is saved in status (the status subresource: only the operator writes it), no ConfigMap
    (saved,) = body["status"]["savedPolicies"]
    assert saved["name"] == "allow-all" and json.loads(saved["manifest"])["spec"] == ALLOW_ALL
    assert not [c for c in api.writes() if c.plural == "configmaps"]
    # the network is contained first: the policy is the first write after the admission
    writes = [(c.verb, c.plural) for c in api.writes() if c.plural != "events" and c.subresource != "status"]
    assert writes[0] == ("create", "networkpolicies")

    assert workload(api, kube.DEPLOYMENTS, "api")["spec"]["replicas"] == 0
    assert workload(api, kube.DEPLOYMENTS, "frontend")["spec"]["replicas"] == 0
    assert workload(api, kube.STATEFUL_SETS, "postgresql")["spec"]["replicas"] == 1  # the database keeps running
    assert workload(api, kube.CRON_JOBS, "report")["spec"]["suspend"] is True
    scaled = {c.name for c in api.calls if c.verb == "patch" and c.subresource == "scale"}
    assert scaled == {"api", "frontend"}  # replicas change only through /scale

    recorded = {s["name"]: s for s in body["status"]["snapshot"]}
    assert (recorded["api"]["replicas"], recorded["api"]["hpaMinReplicas"], recorded["api"]["hpaMaxReplicas"]) == (
        4,
        2,
        10,
    )
    assert recorded["report"]["suspend"] is False and recorded["postgresql"]["kept"]
    assert body["status"]["scaled"] == "2/3" and body["status"]["removedPolicies"] == ["allow-all"]
    annotation = json.loads(workload(api, kube.DEPLOYMENTS, "api")["metadata"]["annotations"][SNAPSHOT_ANNOTATION])
    assert annotation["uid"] == body["metadata"]["uid"] and annotation["snapshot"]["replicas"] == 4
    assert SNAPSHOT_ANNOTATION not in (
        workload(api, kube.STATEFUL_SETS, "postgresql")["metadata"].get("annotations") or {}
    )


def test_release_from_the_annotations_restores_exact_counts_and_suspend_flags() -> None:
    api = FakeApi()
    isolated(api, overrideExistingPolicies=True)
    # status lost but for its phase and the saved policies: release works from what the workloads carry
    kept = {k: fresh(api)["status"][k] for k in ("phase", "removedPolicies", "savedPolicies")}
    api.patch(isolation.EMERGENCY_ISOLATIONS, NS, "breach", {"status": None}, subresource="status")
    api.patch(isolation.EMERGENCY_ISOLATIONS, NS, "breach", {"status": kept}, subresource="status")

    assert release(api) == Result.done()

    assert workload(api, kube.DEPLOYMENTS, "api")["spec"]["replicas"] == 4
    assert workload(api, kube.DEPLOYMENTS, "frontend")["spec"]["replicas"] == 3
    assert workload(api, kube.STATEFUL_SETS, "postgresql")["spec"]["replicas"] == 1
    assert workload(api, kube.CRON_JOBS, "report")["spec"]["suspend"] is False
    for resource, name in ((kube.DEPLOYMENTS, "api"), (kube.DEPLOYMENTS, "frontend"), (kube.CRON_JOBS, "report")):
        assert SNAPSHOT_ANNOTATION not in (workload(api, resource, name)["metadata"].get("annotations") or {})
    assert workload(api, kube.NETWORK_POLICIES, "allow-all")["spec"] == ALLOW_ALL
    assert api.stored(kube.NETWORK_POLICIES, NS, POLICY_NAME) is None
    assert api.stored(kube.CONFIG_MAPS, NS, saved_policies_name("breach")) is None
    status = fresh(api)["status"]
    assert status["phase"] == "Released"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Restored"] == "True"
    assert {c["type"]: c["status"] for c in status["conditions"]}["PoliciesRestored"] == "True"
    assert status.get("savedPolicies", []) == []

    # a second release pass (a resync) changes nothing
    api.calls.clear()
    assert run(api, fresh(api)) == Result.done()
    assert api.writes() == []


def conditions(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in body["status"]["conditions"]}


def assert_workloads_back(api: FakeApi) -> None:
    assert workload(api, kube.DEPLOYMENTS, "api")["spec"]["replicas"] == 4
    assert workload(api, kube.DEPLOYMENTS, "frontend")["spec"]["replicas"] == 3
    assert workload(api, kube.CRON_JOBS, "report")["spec"]["suspend"] is False
    assert api.stored(kube.NETWORK_POLICIES, NS, POLICY_NAME) is None


def test_a_saved_policy_the_api_server_refuses_is_a_condition_and_the_release_completes() -> None:
    """Issue 13: the workloads come back first; a policy that cannot be recreated is named in
    PoliciesRestored=False and a Warning, kept in status for a person, and the release completes."""
    api = FakeApi()
    isolated(api, overrideExistingPolicies=True)
    api.fail_on("create", "networkpolicies", status=422)

    assert release(api) == Result.done()

    assert_workloads_back(api)
    assert api.stored(kube.NETWORK_POLICIES, NS, "allow-all") is None
    body = fresh(api)
    assert body["status"]["phase"] == "Released"
    found = conditions(body)
    assert found["Ready"]["status"] == "True" and "PoliciesRestored" in found["Ready"]["message"]
    assert (found["PoliciesRestored"]["status"], found["PoliciesRestored"]["reason"]) == ("False", "NotRecreated")
    assert found["PoliciesRestored"]["message"].startswith("NetworkPolicies not recreated")
    assert "allow-all: Kubernetes API: HTTP 422" in found["PoliciesRestored"]["message"]
    assert [p["name"] for p in body["status"]["savedPolicies"]] == ["allow-all"]  # for a person to apply
    warnings = [c.body["reason"] for c in api.writes() if c.plural == "events" and c.body["type"] == "Warning"]
    assert warnings == ["PoliciesNotRestored"]


def test_a_server_error_recreating_a_policy_retries_after_the_workloads_are_back() -> None:
    api = FakeApi()
    isolated(api, overrideExistingPolicies=True)
    api.fail_on("create", "networkpolicies", status=503)

    result = release(api)

    assert result.error is not None and result.requeue_after is not None  # retried
    assert workload(api, kube.DEPLOYMENTS, "api")["spec"]["replicas"] == 4  # already back
    assert fresh(api)["status"]["phase"] == "Releasing"
    assert run(api, fresh(api)) == Result.done()
    assert_workloads_back(api)
    assert workload(api, kube.NETWORK_POLICIES, "allow-all")["spec"] == ALLOW_ALL
    assert conditions(fresh(api))["PoliciesRestored"]["status"] == "True"


def test_a_failed_removal_after_the_policies_came_back_still_reports_them_recreated() -> None:
    """The saved entries leave status only once the release got past removing emergency-isolate: a retry
    after that failed must not take a recreated policy for one an older operator saved."""
    api = FakeApi()
    isolated(api, overrideExistingPolicies=True)
    api.fail_on("get", "networkpolicies", status=503)

    assert release(api).error is not None  # the removal failed: retried
    assert workload(api, kube.NETWORK_POLICIES, "allow-all")["spec"] == ALLOW_ALL
    assert run(api, fresh(api)) == Result.done()
    assert_workloads_back(api)
    assert conditions(fresh(api))["PoliciesRestored"]["status"] == "True"


def test_a_tampered_saved_policy_is_refused_and_the_others_are_recreated() -> None:
    api = FakeApi()
    namespace(api)
    api.put(kube.NETWORK_POLICIES, NS, {"metadata": {"name": "allow-dns"}, "spec": {"podSelector": {}}})
    create(api, overrideExistingPolicies=True)
    assert run(api, fresh(api)) == Result.done()
    saved = fresh(api)["status"]["savedPolicies"]
    manifest = json.loads(saved[0]["manifest"])
    manifest["metadata"]["namespace"] = "kube-system"
    saved[0]["manifest"] = json.dumps(manifest)
    api.patch(isolation.EMERGENCY_ISOLATIONS, NS, "breach", {"status": {"savedPolicies": saved}}, subresource="status")

    assert release(api) == Result.done()

    assert_workloads_back(api)
    assert api.stored(kube.NETWORK_POLICIES, "kube-system", "allow-all") is None
    assert api.stored(kube.NETWORK_POLICIES, NS, "allow-all") is None
    assert api.stored(kube.NETWORK_POLICIES, NS, "allow-dns") is not None
    message = conditions(fresh(api))["PoliciesRestored"]["message"]
    assert "allow-all: the saved manifest is refused: metadata.namespace is not" in message


def test_a_planted_config_map_is_never_read_and_an_older_operators_isolation_still_releases() -> None:
    """Before issue 13 the manifests were in ConfigMap <name>-saved-policies, which any namespace user who may
    write ConfigMaps could have planted or edited: it is not read. An isolation made then (removedPolicies,
    no savedPolicies) releases its workloads and names each policy for a person to review and apply."""
    api = FakeApi()
    isolated(api, overrideExistingPolicies=True)
    planted = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "allow-all"}}
    uid = fresh(api)["metadata"]["uid"]
    api.put(
        kube.CONFIG_MAPS,
        NS,
        {
            "metadata": {
                "name": saved_policies_name("breach"),
                # even with the isolation's own uid: anyone who may create the ConfigMap can write that
                "ownerReferences": [{"kind": "EmergencyIsolation", "name": "breach", "uid": uid}],
            },
            "data": {"allow-all.json": json.dumps({**planted, "spec": ALLOW_ALL})},
        },
    )
    api.patch(isolation.EMERGENCY_ISOLATIONS, NS, "breach", {"status": {"savedPolicies": None}}, subresource="status")
    api.calls.clear()

    assert release(api) == Result.done()

    assert_workloads_back(api)
    assert api.stored(kube.NETWORK_POLICIES, NS, "allow-all") is None
    assert not [c for c in api.calls if c.plural == "configmaps"]
    message = conditions(fresh(api))["PoliciesRestored"]["message"]
    assert f"allow-all: saved by an older operator in ConfigMap {saved_policies_name('breach')}" in message


def test_the_guard_with_the_policy_in_place_reads_and_writes_nothing() -> None:
    api = FakeApi()
    body = isolated(api, allowDNS=True, allowEgressTo=["10.20.0.0/16"])
    api.calls.clear()

    assert run(api, body, isolation.GUARD) == Result.done()

    assert [(c.verb, c.plural, c.name) for c in api.calls] == [("get", "networkpolicies", POLICY_NAME)]
    assert api.writes() == []


def test_the_guard_puts_back_a_policy_deleted_by_hand() -> None:
    api = FakeApi()
    body = isolated(api)
    desired = workload(api, kube.NETWORK_POLICIES, POLICY_NAME)
    api.delete(kube.NETWORK_POLICIES, NS, POLICY_NAME)
    api.calls.clear()

    assert run(api, body, isolation.GUARD) == Result.done()

    assert workload(api, kube.NETWORK_POLICIES, POLICY_NAME)["spec"] == desired["spec"]
    writes = [(c.verb, c.plural) for c in api.writes()]
    assert writes == [("create", "networkpolicies"), ("create", "events")]
    (event,) = [c.body for c in api.writes() if c.plural == "events"]
    assert (event["type"], event["reason"]) == ("Warning", "NetworkContained")


def test_the_guard_puts_back_a_drifted_policy_with_one_patch() -> None:
    api = FakeApi()
    body = isolated(api)
    api.patch(kube.NETWORK_POLICIES, NS, POLICY_NAME, {"spec": {"ingress": [{}]}})
    api.calls.clear()

    assert run(api, body, isolation.GUARD) == Result.done()

    assert workload(api, kube.NETWORK_POLICIES, POLICY_NAME)["spec"] == {
        "podSelector": {},
        "policyTypes": ["Ingress", "Egress"],
    }
    assert [(c.verb, c.plural) for c in api.writes()] == [("patch", "networkpolicies"), ("create", "events")]


def test_a_second_isolation_is_rejected_by_the_index_and_touches_nothing() -> None:
    api = FakeApi()
    isolated(api)
    create(api, "second")
    api.calls.clear()

    result = run(api, fresh(api, "second"))

    assert result.error is not None and result.error.reason == "AlreadyIsolated"
    assert result.requeue_after is None  # waits for a change
    assert fresh(api, "second")["status"]["phase"] == "Rejected"
    assert {c.plural for c in api.writes()} == {"emergencyisolations", "events"}
    assert not [c for c in api.calls if c.verb == "list" and c.plural == "emergencyisolations"]  # no LIST


def test_holder_from_index_answers_like_holding_isolation() -> None:
    def entry(name: str, created: str, **status: Any) -> dict[str, Any]:
        return index_entry({"metadata": {"name": name, "creationTimestamp": created}, "spec": {}, "status": status})

    holder = holder_from_index(
        {NS: [entry("late", "2026-01-02T00:00:00Z"), entry("early", "2026-01-01T00:00:00Z")], "other": []}
    )
    assert holder(NS) == "early" and holder("other") is None and holder("unknown") is None
    released = holder_from_index({NS: [entry("done", "2026-01-01T00:00:00Z", phase="Released")]})
    assert released(NS) is None


# --- containment first: the fast path and the watch guard -------------------------------------------------------
def contain_first(api: FakeApi, body: dict[str, Any]) -> bool:
    """The fast path as main.py runs it on a watch event (``contain_new``): the interlock from the index, no
    grants; whether it created the policy."""
    stored = [index_entry(b) for (plural, _, _), b in api.objects.items() if plural == "emergencyisolations"]
    holder = holder_from_index({NS: stored})
    before = api.stored(kube.NETWORK_POLICIES, NS, POLICY_NAME)
    asyncio.run(isolation.contain_new(body, isolation=holder, grants=lambda _: (), api=api))
    return before is None and api.stored(kube.NETWORK_POLICIES, NS, POLICY_NAME) is not None


def test_the_fast_path_contains_with_one_create_before_any_read_and_the_pass_continues() -> None:
    api = FakeApi()
    namespace(api)
    body = create(api, allowDNS=True)

    assert contain_first(api, body) is True

    assert [(c.verb, c.plural, c.subresource) for c in api.calls] == [  # the policy first, nothing read before
        ("create", "networkpolicies", None),
        ("patch", "emergencyisolations", "status"),
        ("create", "events", None),
    ]
    assert set(api.calls[1].body["status"]) == {"isolatedAt"}  # the pass owns every other status field
    policy = workload(api, kube.NETWORK_POLICIES, POLICY_NAME)
    assert policy["spec"]["egress"][0]["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    contained_at = fresh(api)["status"]["isolatedAt"]

    api.calls.clear()
    assert run(api, fresh(api)) == Result.done()  # the full pass: the policy is there, it goes on from it
    assert not [c for c in api.writes() if c.plural == "networkpolicies" and c.name == POLICY_NAME]
    events = [c.body["reason"] for c in api.writes() if c.plural == "events"]
    assert "NetworkContained" not in events  # told once, by the fast path
    status = fresh(api)["status"]
    assert status["phase"] == "Isolated" and status["isolatedAt"] == contained_at
    assert workload(api, kube.DEPLOYMENTS, "api")["spec"]["replicas"] == 0

    api.calls.clear()
    assert contain_first(api, fresh(api)) is False  # later events of the same isolation: no call at all
    assert api.calls == []


def test_the_fast_path_leaves_every_other_case_to_the_pass_without_a_call() -> None:
    api = FakeApi()
    isolated(api)
    second = create(api, "second")
    released = create(api, "released")
    api.patch(isolation.EMERGENCY_ISOLATIONS, NS, "released", {"spec": {"released": True}})
    invalid = create(api, "invalid")
    api.patch(isolation.EMERGENCY_ISOLATIONS, NS, "invalid", {"spec": {"severity": "P9"}})
    api.calls.clear()

    assert contain_first(api, second) is False  # the namespace is held by another isolation
    assert contain_first(api, fresh(api, "released")) is False
    assert contain_first(api, fresh(api, "invalid")) is False
    assert contain_first(api, {**released, "metadata": {**released["metadata"], "deletionTimestamp": "now"}}) is False
    assert [c for c in api.calls if c.plural == "networkpolicies"] == []
    assert invalid["metadata"]["name"] == "invalid"


def test_the_fast_path_applies_the_tenancy_rules_first() -> None:
    api = FakeApi()
    body = create(api)
    evidence = {
        "capture": True,
        "destination": {
            "bucket": "evidence",
            "endpoint": "https://s3.attacker.example",
            "credentialsSecretRef": {"name": "s3"},
        },
        "encryption": {"gpg": {"recipientsConfigMapRef": {"name": "keys", "key": "team.asc"}}},
    }
    api.patch(isolation.EMERGENCY_ISOLATIONS, NS, "breach", {"spec": {"evidence": evidence}})
    api.calls.clear()

    assert contain_first(api, fresh(api)) is False  # an endpoint no RunbookGrant lists: the pass says NotPermitted
    assert api.calls == []
    assert body["metadata"]["name"] == "breach"


def test_the_fast_path_leaves_a_hand_made_policy_to_the_pass_which_adopts_it() -> None:
    api = FakeApi()
    namespace(api)
    api.put(kube.NETWORK_POLICIES, NS, {"metadata": {"name": POLICY_NAME}, "spec": {"podSelector": {}}})
    body = create(api)

    assert contain_first(api, body) is False  # the create was a 409: no status, no Event
    assert [(c.verb, c.plural) for c in api.calls if c.plural != "networkpolicies"] == []

    assert run(api, fresh(api)) == Result.done()
    policy = workload(api, kube.NETWORK_POLICIES, POLICY_NAME)
    assert policy["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    assert policy["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_the_watch_guard_acts_only_on_a_deleted_or_edited_policy_of_an_isolated_isolation() -> None:
    api = FakeApi()
    body = isolated(api, allowEgressTo=["10.20.0.0/16"])
    entries = [isolation.guard_entry(b) for (p, _, _), b in api.objects.items() if p == "emergencyisolations"]
    policy = workload(api, kube.NETWORK_POLICIES, POLICY_NAME)
    edited = {**policy, "spec": {**policy["spec"], "ingress": [{}]}}
    api.calls.clear()

    # the events of the operator's own writes, and of the listing after a restart: nothing to do
    for event in (None, "ADDED", "MODIFIED"):
        assert isolation.guarded_isolation(event, policy, entries) is None
    assert isolation.guarded_isolation("DELETED", policy, entries) == "breach"
    assert isolation.guarded_isolation("MODIFIED", edited, entries) == "breach"
    assert api.calls == []  # deciding reads nothing

    foreign = {
        **policy,
        "metadata": {**policy["metadata"], "ownerReferences": [{"kind": "EmergencyIsolation", "uid": "x"}]},
    }
    assert isolation.guarded_isolation("DELETED", foreign, entries) is None
    releasing = isolation.guard_entry({**body, "spec": {**body["spec"], "released": True}})
    assert releasing["policy"] is None and isolation.guarded_isolation("DELETED", policy, [releasing]) is None
    isolating = isolation.guard_entry({**body, "status": {**body["status"], "phase": "Isolating"}})
    assert isolation.guarded_isolation("DELETED", policy, [isolating]) is None  # the pass holds it then
    open_network = isolation.guard_entry({**body, "spec": {**body["spec"], "network": {"isolate": False}}})
    assert isolation.guarded_isolation("DELETED", policy, [open_network]) is None


def test_put_back_recreates_a_deleted_policy_and_retries_a_failed_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi()
    isolated(api)
    desired = workload(api, kube.NETWORK_POLICIES, POLICY_NAME)
    api.delete(kube.NETWORK_POLICIES, NS, POLICY_NAME)
    api.fail_on("create", "networkpolicies", status=500)
    slept: list[float] = []

    async def no_wait(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(isolation.asyncio, "sleep", no_wait)
    asyncio.run(isolation.put_back(NS, "breach", grants=lambda _: (), api=api))

    assert slept == [10.0]  # one failed pass (Ready=False, reported), then the next one put it back
    assert workload(api, kube.NETWORK_POLICIES, POLICY_NAME)["spec"] == desired["spec"]
    assert conditions(fresh(api))["Ready"]["status"] == "False"  # the failure stays visible until the next pass

    api.calls.clear()
    asyncio.run(isolation.put_back(NS, "breach", grants=lambda _: (), api=api))  # in place: one read, no write
    assert [(c.verb, c.plural) for c in api.calls] == [("get", "emergencyisolations"), ("get", "networkpolicies")]


def test_a_fast_path_stopped_after_the_create_leaves_the_pass_to_record_when_it_contained() -> None:
    api = FakeApi()
    namespace(api)
    body = create(api)
    api.fail_on("patch", "emergencyisolations", status=500)

    assert contain_first(api, body) is True  # the policy is in place; isolatedAt could not be written

    assert "isolatedAt" not in fresh(api).get("status", {})
    assert run(api, fresh(api)) == Result.done()
    policy = workload(api, kube.NETWORK_POLICIES, POLICY_NAME)
    assert fresh(api)["status"]["isolatedAt"] == policy["metadata"]["creationTimestamp"]
