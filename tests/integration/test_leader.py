"""Leader election (operator/runbook_operator/leader.py) against the real API server, with the shipped RBAC.

Two electors in-process show the Lease's mutual exclusion and takeover; then two ``runbook-operator run``
processes, as the Deployment's two replicas: the leader is SIGKILLed while a SecretRotation (real
PostgreSQL) waits for its rollout and an EmergencyIsolation hangs in its evidence upload, and the standby,
which did nothing before, finishes both exactly once.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from tests.helpers import OperatorProcess
from tests.integration import test_isolation as isolation_tests
from tests.integration import test_rotation as rotation_tests
from tests.integration.conftest import enabled_namespace, grant
from tests.integration.test_isolation import cluster, evidence_store  # noqa: F401 - fixtures, in `namespace`
from tests.services import Postgres, S3Server, free_port

from runbook_operator.builders.rotation import ROTATION_ID, fingerprint
from runbook_operator.clients.kube import KubeApi
from runbook_operator.leader import LEASES, Elector

pytestmark = pytest.mark.integration

LEASE_NAMESPACE, LEASE_NAME = "runbook-system", "runbook-operator"  # deploy/'s: the Role names only this one
# Short timings (the defaults are 15 / 10 / 2 s); the same order the settings require.
DURATION, RENEW_DEADLINE, RETRY = 4.0, 2.5, 0.5
WaitFor = Callable[..., Any]


@pytest.fixture
def operator_api(operator_kubeconfig: Path) -> Iterator[KubeApi]:
    """``Api`` as the operator's ServiceAccount (deploy/'s RBAC)."""
    client = kubernetes.config.new_client_from_config(config_file=str(operator_kubeconfig))
    try:
        yield KubeApi(client)
    finally:
        client.close()


@pytest.fixture
def no_lease(api: kubernetes.client.ApiClient) -> Iterator[None]:
    """The Lease absent before and after the test (each test starts its own election)."""
    coordination = kubernetes.client.CoordinationV1Api(api)

    def delete() -> None:
        try:
            coordination.delete_namespaced_lease(LEASE_NAME, LEASE_NAMESPACE)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise

    delete()
    try:
        yield
    finally:
        delete()


@pytest.fixture
def electors() -> Iterator[list[Elector]]:
    """The test's electors, each released (its renewal and watchdog threads stopped) when the test ends, passed
    or not: a renewal thread left running would go on logging into every later test's capture."""
    made: list[Elector] = []
    try:
        yield made
    finally:
        for each in made:
            each.release()


def elector(api: KubeApi, holder: str, lost: list[str] | None = None) -> Elector:
    return Elector(
        api,
        LEASE_NAMESPACE,
        LEASE_NAME,
        holder=holder,
        duration=DURATION,
        renew_deadline=RENEW_DEADLINE,
        retry_period=RETRY,
        on_lost=(lambda: lost.append(holder)) if lost is not None else None,
    )


def test_one_holder_at_a_time_and_takeover_only_after_the_duration(
    operator_api: KubeApi, no_lease: None, electors: list[Elector]
) -> None:
    lost: list[str] = []
    first, second = elector(operator_api, "first", lost), elector(operator_api, "second", lost)
    electors += [first, second]
    assert first.try_acquire()  # creates the Lease
    assert not second.try_acquire()
    first.hold()
    time.sleep(DURATION + 1)  # renewed all along: never expired for the second
    assert not second.try_acquire()
    lease = operator_api.get(LEASES, LEASE_NAMESPACE, LEASE_NAME)
    assert lease is not None and lease["spec"]["holderIdentity"] == "first"

    # A write on a stale resourceVersion is refused (the second's takeover raced by a renewal).
    stale = str(lease["metadata"]["resourceVersion"])
    time.sleep(2 * RETRY)
    assert not second._write(stale, {"holderIdentity": "second"}, 0.0)

    # The first stops renewing (released without a write, as a killed process): the second must wait a whole
    # duration after it last saw a change, then takes it.
    first._stopped.set()
    first._version = None
    stopped = time.monotonic()
    while not second.try_acquire():
        time.sleep(RETRY)
    waited = time.monotonic() - stopped
    assert DURATION - RETRY <= waited <= DURATION + 3 * RETRY + 2, waited
    lease = operator_api.get(LEASES, LEASE_NAMESPACE, LEASE_NAME)
    assert lease is not None
    assert (lease["spec"]["holderIdentity"], lease["spec"]["leaseTransitions"]) == ("second", 1)

    # The first, renewing again on its old version, finds another holder: lost at once.
    assert not first.renew() and not first.try_acquire()
    # A graceful release lets the next one in at its next look.
    second.hold()
    second.release()
    assert first.try_acquire()
    assert lost == []


class Unreachable(Elector):
    """A leader whose renewals all fail (an API server it can no longer reach)."""

    def renew(self) -> bool:
        raise TimeoutError("API server unreachable")


def test_watchdog_gives_up_before_the_lease_can_expire(
    operator_api: KubeApi, no_lease: None, electors: list[Elector]
) -> None:
    lost: list[float] = []
    leader = Unreachable(
        operator_api,
        LEASE_NAMESPACE,
        LEASE_NAME,
        holder="leader",
        duration=DURATION,
        renew_deadline=RENEW_DEADLINE,
        retry_period=RETRY,
        on_lost=lambda: lost.append(time.monotonic()),
    )
    electors.append(leader)
    started = time.monotonic()
    assert leader.try_acquire()
    before = set(threading.enumerate())
    leader.hold()
    threads = {t for t in set(threading.enumerate()) - before if t.name.startswith("lease-")}  # renew, watchdog
    while not lost and time.monotonic() < started + 2 * DURATION:
        time.sleep(0.05)
    assert lost, "the watchdog never gave up"
    assert RENEW_DEADLINE <= lost[0] - started < DURATION, "must end after the deadline, before the Lease expires"
    # Lost: neither thread goes on (the process would have ended; here the test's process goes on).
    time.sleep(3 * RETRY)
    assert len(lost) == 1
    assert len(threads) == 2 and not any(t.is_alive() for t in threads), threads


def test_the_operators_role_holds_only_its_own_lease(operator_api: KubeApi) -> None:
    """deploy/'s Role names the Lease: another name (another shard's, not added to the Role) is forbidden."""
    other = Elector(
        operator_api,
        LEASE_NAMESPACE,
        f"other-{uuid.uuid4().hex[:6]}",
        holder="x",
        duration=DURATION,
        renew_deadline=RENEW_DEADLINE,
        retry_period=RETRY,
    )
    with pytest.raises(kubernetes.client.ApiException) as refused:
        other.try_acquire()
    assert refused.value.status == 403


# --- two operator processes ---------------------------------------------------------------------------------


@pytest.fixture
def rotation_namespace(api: kubernetes.client.ApiClient, postgres: Postgres) -> Iterator[str]:
    """Another enabled namespace, the rotation's (an EmergencyIsolation pauses the rotations in its own),
    granted the session's PostgreSQL."""
    with enabled_namespace(api) as name:
        yield name


class LeaseHistory:
    """Samples the Lease's holder every 50 ms: the sequence of holders and when each first appeared."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.coordination = kubernetes.client.CoordinationV1Api(api)
        self.holders: list[tuple[str | None, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def holder(self) -> str | None:
        try:
            return self.coordination.read_namespaced_lease(LEASE_NAME, LEASE_NAMESPACE).spec.holder_identity
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            holder = self.holder()
            if not self.holders or self.holders[-1][0] != holder:
                self.holders.append((holder, time.monotonic()))

    def __enter__(self) -> LeaseHistory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def replica(kubeconfig: Path, namespaces: list[str], log: Path, pod: str, metrics_port: int) -> OperatorProcess:
    operator = OperatorProcess(kubeconfig, namespaces[0], log, extra_args=("--namespace", namespaces[1]))
    operator.env.update(
        RUNBOOK_METRICS_PORT=str(metrics_port),
        RUNBOOK_LEADER_ELECTION="true",
        RUNBOOK_LEASE_NAMESPACE=LEASE_NAMESPACE,
        RUNBOOK_LEASE_DURATION=str(DURATION),
        RUNBOOK_LEASE_RENEW_DEADLINE=str(RENEW_DEADLINE),
        RUNBOOK_LEASE_RETRY_PERIOD=str(RETRY),
        POD_NAME=pod,
    )
    return operator


def leading(metrics_port: int) -> float | None:
    """The replica's runbook_leader gauge, from its /metrics (None while it serves none yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    found = re.search(r"^runbook_leader ([0-9.]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def event_count(core: kubernetes.client.CoreV1Api, namespace: str, name: str, reason: str) -> int:
    selector = f"involvedObject.name={name},reason={reason}"
    return sum(e.count or 1 for e in core.list_namespaced_event(namespace, field_selector=selector).items)


def test_standby_takes_over_a_rotation_and_an_isolation_in_flight_exactly_once(
    api: kubernetes.client.ApiClient,
    cluster: isolation_tests.Cluster,  # noqa: F811 - test_isolation's fixtures
    evidence_store: dict[str, Any],  # noqa: F811
    namespace: str,
    rotation_namespace: str,
    operator_kubeconfig: Path,
    postgres: Postgres,
    s3_server: S3Server,
    no_lease: None,
    tmp_path: Path,
    wait_for: WaitFor,
) -> None:
    rotations = rotation_tests.Cluster(api, rotation_namespace, wait_for)
    isolations, evidence = cluster, evidence_store
    core, apps = rotations.core, rotations.apps

    # The rotation's world: a PostgreSQL role, its Secret, a Deployment whose rollout cannot finish yet (no
    # node matches its selector), so the rotation waits after publishing.
    role = rotation_tests.PgRole(postgres)
    rotation_tests.admin_secret(rotations, postgres)
    rotations.create_secret(rotation_tests.SECRET, {"POSTGRES_PASSWORD": role.password})
    rotations.create_deployment("api", schedulable=False)
    # The isolation's world: the runbook's workloads, an evidence store behind a port that holds every
    # connection unanswered (the upload hangs).
    isolations.create_runbook_workloads()
    tarpit = isolation_tests.Tarpit(s3_server.port)
    evidence["destination"]["endpoint"] = tarpit.endpoint
    grant(api, namespace, endpoints=[tarpit.endpoint])  # the test's own S3 endpoint

    namespaces = [namespace, rotation_namespace]
    ports = free_port(), free_port()
    first = replica(operator_kubeconfig, namespaces, tmp_path / "first.log", "replica-a", ports[0])
    second = replica(operator_kubeconfig, namespaces, tmp_path / "second.log", "replica-b", ports[1])
    try:
        with LeaseHistory(api) as history:
            first.start()
            wait_for(lambda: (history.holder() or "").startswith("replica-a_"), timeout=60, what="the first to lead")
            second.start()
            wait_for(lambda: "is held by replica-a_" in second.output(), timeout=60, what="the second as standby")
            assert (leading(ports[0]), leading(ports[1])) == (1.0, 0.0)  # the standby is scraped too

            rotations.create_rotation(
                "app",
                {
                    "secretRef": {"name": rotation_tests.SECRET, "key": "POSTGRES_PASSWORD"},
                    "target": rotation_tests.pg_target(postgres, role.name),
                    "restartTargets": [{"kind": "Deployment", "name": "api"}],
                    "rotateNow": "1",
                },
            )
            isolations.create_isolation("breach", isolation_tests.breach_spec(evidence))

            # Mid-rotation: published, waiting for the rollout. Mid-isolation: snapshot taken, upload hanging.
            wait_for(lambda: rotations.rotation("app").get("status", {}).get("step") == "Published", timeout=90)
            wait_for(lambda: tarpit.held, timeout=60, what="the evidence upload to start")
            in_flight = rotations.rotation("app")["status"]
            published = core.read_namespaced_secret(rotation_tests.SECRET, rotation_namespace)
            assert isolations.status("breach").get("snapshot")
            assert isolations.replicas() == {**isolation_tests.REPLICAS, **isolation_tests.KEPT}

            first.kill()
            killed = time.monotonic()
            tarpit.forward()
            wait_for(lambda: (history.holder() or "").startswith("replica-b_"), timeout=30, what="the takeover")
            took_over = time.monotonic() - killed
            wait_for(lambda: leading(ports[1]) == 1.0, timeout=30, what="the new leader's runbook_leader 1")

            apps.patch_namespaced_deployment(
                "api", rotation_namespace, {"spec": {"template": {"spec": {"nodeSelector": None}}}}
            )
            done = rotations.wait_rotated("app", "1", timeout=120)
            rotated = time.monotonic() - killed
            isolation_tests.wait_phase(isolations, wait_for, "breach", "Isolated", timeout=120)
            isolated = time.monotonic() - killed
            print(f"takeover {took_over:.1f}s after SIGKILL; rotation done {rotated:.1f}s, isolated {isolated:.1f}s")

            # The rotation: the same one, its Secret published once (not written again after the takeover).
            secret = core.read_namespaced_secret(rotation_tests.SECRET, rotation_namespace)
            assert secret.metadata.resource_version == published.metadata.resource_version
            new = rotations.secret()["POSTGRES_PASSWORD"]  # type: ignore[index]
            assert done["rotationId"] == in_flight["rotationId"] and done["fingerprint"] == fingerprint(new)
            assert role.login(new) and not role.login(role.password)
            assert rotations.pending("app") is None
            deployment = apps.read_namespaced_deployment("api", rotation_namespace)
            assert deployment.spec.template.metadata.annotations[ROTATION_ID] == done["rotationId"]
            assert deployment.metadata.generation == 3  # created, stamped once, unblocked by the test

            # The isolation: scaled once from the recorded counts, one evidence archive.
            assert isolations.replicas() == {**dict.fromkeys(isolation_tests.REPLICAS, 0), **isolation_tests.KEPT}
            status = isolations.status("breach")
            assert {
                s["name"]: s.get("replicas") for s in status["snapshot"] if s["name"] in isolation_tests.REPLICAS
            } == isolation_tests.REPLICAS
            stored = s3_server.client().list_objects_v2(Bucket=evidence["destination"]["bucket"]).get("Contents", [])
            assert {o["Key"] for o in stored} == {status["evidence"]["key"], status["evidence"]["manifestKey"]}
            assert event_count(core, namespace, "breach", "ScaledToZero") == 1
            assert event_count(core, namespace, "breach", "EvidencePreserved") == 1

            isolations.patch_spec("breach", {"released": True})
            isolation_tests.wait_phase(isolations, wait_for, "breach", "Released")
            isolation_tests.assert_released_exactly(isolations)
            assert event_count(core, namespace, "breach", "WorkloadsRestored") == 1
            second.terminate()  # SIGTERM, as a rolling update stops a pod: kopf stops, then the Lease is released
            wait_for(lambda: history.holders[-1][0] is None, timeout=10, what="the Lease released")
    finally:
        first.stop()
        second.stop()
        tarpit.close()

    # One takeover: the first, then the second (and none after); the Lease released by the second's SIGTERM.
    holders = [h for h, _ in history.holders]
    assert [h.split("_")[0] if h else h for h in holders] == [None, "replica-a", "replica-b", None], holders
    assert history.holder() is None
    # The standby did nothing before it held the Lease: every line it wrote until then is about the Lease.
    lines = second.output().splitlines()
    acquired = next(i for i, line in enumerate(lines) if "acquired as replica-b_" in line)
    assert acquired > 0 and all("Lease" in line for line in lines[: acquired + 1]), lines[: acquired + 1]
    # The audit line of the rotation: once, from the second.
    audits = [line for log in (first, second) for line in log.output().splitlines() if "secret_rotated" in line]
    assert len(audits) == 1 and "secret_rotated" in second.output(), audits
    assert json.loads(audits[0])  # a JSON log line
