"""Leader election over a ``coordination.k8s.io/v1`` Lease: with several replicas, one acts, the others wait.

A replica that does not hold the Lease is a hot standby: the process is up, answers /healthz and reads the
Lease every retry period, but kopf is not started, so no handler, daemon or timer of it exists. Once the
Lease has gone unrenewed for its whole duration (as this replica's own clock measures it, from the moment
it last saw the Lease change: no clock skew between nodes matters), or its holder released it, the standby
takes it with a write conditional on the resourceVersion it read (of two standbys, one wins) and only then
starts kopf.

The leader renews every retry period. A watchdog thread, independent of the renewing requests, ends the
process hard (``os._exit``: no handler gets to finish anything) as soon as no renewal succeeded for the
renew deadline, which is shorter than the duration: the old leader is gone before any standby may take
over, so no action is ever done by two replicas. The Deployment restarts the container, which comes back as
a standby. On a graceful stop (SIGTERM) the leader lets kopf and the executor finish, then releases the
Lease, so a standby takes over within one retry period instead of a whole duration.

Why not kopf's peering: peering pauses an operator when it sees a peer of higher priority, asynchronously
(handlers in flight go on) and only after the peer's record is noticed; peers of equal priority all freeze.
That is priority arbitration, not mutual exclusion, and it needs its own CRDs. kopf runs ``standalone``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubernetes.client import ApiException

from .clients.kube import Api, Resource
from .settings import MANAGED_BY, Settings

LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LOST_EXIT_CODE = 75  # the process ended itself because it could not renew the Lease in time
LOG = logging.getLogger("runbook.leader")


def identity() -> str:
    """This process's holder identity: the pod's name (POD_NAME, from the downward API) or the host's, and a
    suffix of its own, so a container restarted in the same pod is a new holder, not its predecessor."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{secrets.token_hex(3)}"


def lease_namespace(settings: Settings) -> str:
    """RUNBOOK_LEASE_NAMESPACE, else the operator's own namespace (POD_NAMESPACE, else the pod's service
    account's)."""
    if settings.lease_namespace:
        return settings.lease_namespace
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    raise ValueError(
        "RUNBOOK_LEADER_ELECTION needs the Lease's namespace: set RUNBOOK_LEASE_NAMESPACE (or POD_NAMESPACE)"
    )


def _micro_time() -> str:
    """Now as a Kubernetes MicroTime."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    """One replica's view of the Lease: ``acquire`` (blocks as a standby), ``hold`` (renews in the background
    and ends the process when it cannot), ``release``. Blocking: the Lease calls go through ``Api``."""

    def __init__(
        self,
        api: Api,
        namespace: str,
        name: str,
        *,
        holder: str,
        duration: float,
        renew_deadline: float,
        retry_period: float,
        clock: Callable[[], float] = time.monotonic,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.api, self.namespace, self.name, self.holder = api, namespace, name, holder
        self.duration, self.renew_deadline, self.retry_period = duration, renew_deadline, retry_period
        self.clock = clock
        self.on_lost = on_lost or _exit_hard
        self._version: str | None = None  # resourceVersion of the Lease as we last read or wrote it
        self._observed: tuple[str | None, float] = (None, 0.0)  # a resourceVersion and when we first saw it
        self._renewed = 0.0  # clock() before the last renewal that succeeded
        self._stopped = threading.Event()  # set: neither loop renews nor watches any more
        self._lost_lock = threading.Lock()
        self._renewing: threading.Thread | None = None
        self.last_poll = clock()
        self.seen_holder: str | None = None  # the holder the last look found

    @classmethod
    def from_settings(cls, api: Api, settings: Settings) -> Elector:
        return cls(
            api,
            lease_namespace(settings),
            settings.lease_name,
            holder=identity(),
            duration=settings.lease_duration,
            renew_deadline=settings.lease_renew_deadline,
            retry_period=settings.lease_retry_period,
        )

    @property
    def where(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    # --- one attempt ---------------------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """One look at the Lease: True when this replica holds it now (created, taken over, or renewed)."""
        started = self.clock()
        lease = self.api.get(LEASES, self.namespace, self.name)
        self.last_poll = self.clock()
        if lease is None:
            taken = self.api.create(LEASES, self.namespace, self._body())
            if taken:
                self._renewed = started
            return taken
        spec = lease.get("spec") or {}
        version = str(lease["metadata"]["resourceVersion"])
        if version != self._observed[0]:
            # Seen after the read returned: never earlier than the holder's renewal that made this version,
            # so the duration below is measured from no earlier than the holder's own start of it.
            self._observed = (version, self.last_poll)
        current = self.seen_holder = spec.get("holderIdentity")
        if current and current != self.holder:
            unrenewed_for = started - self._observed[1]
            if unrenewed_for <= float(spec.get("leaseDurationSeconds") or self.duration):
                return False
            LOG.info("%s: holder %s did not renew for %.1fs: taking over", self.where, current, unrenewed_for)
        transitions = int(spec.get("leaseTransitions") or 0) + (current != self.holder)
        return self._write(version, {**self._body()["spec"], "leaseTransitions": transitions}, started)

    def renew(self) -> bool:
        """The leader's renewal: one write on the resourceVersion it last wrote (no read); after a conflict, a
        read tells whether the Lease is still ours."""
        started = self.clock()
        if self._version is not None and self._write(self._version, {"renewTime": _micro_time()}, started):
            return True
        lease = self.api.get(LEASES, self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.holder:
            return False
        return self._write(str(lease["metadata"]["resourceVersion"]), {"renewTime": _micro_time()}, started)

    def _body(self) -> dict[str, Any]:
        now = _micro_time()
        spec = {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": math.ceil(self.duration),
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        }
        return {"metadata": {"name": self.name, "labels": dict(MANAGED_BY)}, "spec": spec}

    def _write(self, version: str, spec: dict[str, Any], started: float) -> bool:
        """A merge patch that the API server applies only if the Lease is still at ``version`` (409 else)."""
        try:
            written = self.api.patch(
                LEASES, self.namespace, self.name, {"metadata": {"resourceVersion": version}, "spec": spec}
            )
        except ApiException as error:
            if error.status == 409:
                self._version = None
                return False
            raise
        if written is None:  # deleted meanwhile
            self._version = None
            return False
        self._version = str(written["metadata"]["resourceVersion"])
        self._renewed = started
        return True

    # --- the loops ------------------------------------------------------------------------------------------

    def acquire(self, *, health_port: int = 0) -> None:
        """Block as a hot standby until this replica holds the Lease; meanwhile serve /healthz (the port is
        free again when this returns: kopf serves it next)."""
        health = _standby_health(self, health_port) if health_port else None
        waited = self.clock()
        seen: str | None = None
        try:
            while True:
                try:
                    if self.try_acquire():
                        break
                except Exception as error:  # an API server away for a while: keep waiting
                    LOG.warning("%s: cannot read it (%s); retrying", self.where, type(error).__name__)
                if self.seen_holder != seen:
                    seen = self.seen_holder
                    LOG.info("standby: %s is held by %s", self.where, seen)
                time.sleep(self.retry_period)
        finally:
            if health is not None:
                health.shutdown()
                health.server_close()
        LOG.info("leader: %s acquired as %s after %.1fs as standby", self.where, self.holder, self.clock() - waited)

    def hold(self) -> None:
        """Renew in the background from now on; a watchdog calls ``on_lost`` once the last successful renewal
        is older than the renew deadline or another holder took the Lease. Losing it stops both threads
        first, so ``on_lost`` is called once and, when it returns (a test's), nothing renews any more."""
        self._renewing = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._renewing.start()
        threading.Thread(target=self._watchdog, name="lease-watchdog", daemon=True).start()

    def _renew_loop(self) -> None:
        while not self._stopped.wait(self.retry_period):
            try:
                if not self.renew():
                    LOG.critical("%s: another holder has it", self.where)
                    self._lost()
                    return
            except Exception as error:  # the watchdog decides when too many failed
                LOG.warning("%s: renewal failed (%s)", self.where, type(error).__name__)

    def _watchdog(self) -> None:
        while not self._stopped.wait(min(self.retry_period, self.renew_deadline / 4)):
            late = self.clock() - self._renewed
            if late > self.renew_deadline:
                LOG.critical("%s: not renewed for %.1fs (deadline %.1fs)", self.where, late, self.renew_deadline)
                self._lost()
                return

    def _lost(self) -> None:
        """The Lease is no longer surely ours: stop the other loop, then ``on_lost`` (once, of both loops)."""
        with self._lost_lock:
            if self._stopped.is_set():  # released meanwhile, or the other loop got here first
                return
            self._stopped.set()
        self.on_lost()

    def release(self) -> None:
        """Stop renewing and give the Lease up (a graceful stop: every handler has ended), so a standby takes
        it at its next poll."""
        self._stopped.set()
        if self._renewing is not None:
            self._renewing.join(self.renew_deadline)  # a renewal in flight would make the release conflict
        if self._version is None:
            return
        try:
            self._write(self._version, {"holderIdentity": None, "renewTime": _micro_time()}, self.clock())
            LOG.info("%s released", self.where)
        except Exception as error:  # then it expires after its duration
            LOG.warning("%s: release failed (%s); it expires instead", self.where, type(error).__name__)


def _exit_hard() -> None:
    """The leader could not renew in time: end the process before a standby may take the Lease. No cleanup
    runs and no handler finishes; the state on the API server lets the next leader resume."""
    LOG.critical("exiting: this replica is no longer sure to be the leader")
    logging.shutdown()
    os._exit(LOST_EXIT_CODE)


def _standby_health(elector: Elector, port: int) -> ThreadingHTTPServer:
    """/healthz of a standby: 200 while it keeps polling the Lease (the liveness and readiness probes)."""
    stale_after = max(30.0, 5 * elector.retry_period)

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the http.server interface
            polling = elector.clock() - elector.last_poll < stale_after
            self.send_response(200 if polling else 503)
            self.end_headers()
            self.wfile.write(b"standby\n" if polling else b"not polling the Lease\n")

        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not logged
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Health)  # noqa: S104 - the probes come from the kubelet
    threading.Thread(target=server.serve_forever, name="standby-health", daemon=True).start()
    return server
