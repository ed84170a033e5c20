"""Containment first, off kopf's queues: a watch of its own on EmergencyIsolations that contains a new one at once.

kopf delivers an isolation's event through its shared watch streams, queues and workers, behind the events of
every other object of the operator (1,000 BackupPolicies being reconciled). ``ContainmentWatch`` is an asyncio
task of its own per scope (the whole cluster, or each namespace the operator is limited to), with its own
connection (``kube.LoopCreate.watch``): on ADDED of an isolation that awaits containment (and for each one its
LIST finds) it begins the first containment (``isolation.begin_containment``: the same checks as kopf's path,
the same builder and create), and does not wait for it, so the next events are read meanwhile. kopf's handler
then finds that containment begun (or done) for the uid and waits for it: one create per isolation.

The checks are ``first_containment``'s: a valid spec, the tenancy rules (``grants``: kopf's live index of
RunbookGrants, so until kopf has listed them an isolation whose spec needs a grant is left to kopf's path, which
runs only once that index is full), network.isolate, and the interlock, answered from this watch's own view of
the isolations (complete from its LIST on: a namespace held by another isolation is never contained again).

Leader election: main.py starts this from a kopf startup handler, and cli.py starts kopf only once the replica
holds the Lease (leader.py); a leader that cannot renew ends the process, and a graceful stop cancels this
(kopf's cleanup) before the Lease is released. So only the leader contains.

Reconnects: a watch the server ended goes on from the last resourceVersion (bookmarks keep it fresh); 410 Gone
(or an ERROR event) lists again; any failure waits a bounded backoff (BACKOFF). Every call has a deadline
(``LoopCreate.list``: REQUEST_TIMEOUT; ``watch``: its timeout + WATCH_GRACE).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp
from kubernetes.client import ApiException

from ..clients import kube
from ..models.isolation import holding_isolation
from . import interlock, isolation
from .runtime import CONTAINMENT, GrantsOf

LOG = logging.getLogger(__name__)
BACKOFF = (0.2, 10.0)  # seconds: the first wait after a failure, doubled up to the second
WATCH_SECONDS = 300  # the watch's server-side timeout (then it goes on from where it was)
GLOB = frozenset("*?[!")


def scope_of(namespaces: Sequence[str] | None) -> list[str | None] | None:
    """The watches for kopf's scope: one cluster-wide ([None]) when it watches every namespace ([]), one per
    namespace when it is limited to names; None (no watch: kopf's path only) when the scope is unknown or
    has patterns (kopf's globs and exclusions), which no watch of a namespace's name can follow."""
    if namespaces is None or any(GLOB & set(namespace) for namespace in namespaces):
        return None
    return list(dict.fromkeys(namespaces)) or [None]


class ContainmentWatch:
    """One watch per scope (``scope_of``), started by ``start`` and ended by ``stop`` on the running loop."""

    def __init__(
        self,
        scopes: Sequence[str | None],
        *,
        grants: GrantsOf,
        client: Callable[[], Awaitable[kube.LoopCreate]] = isolation.loop_client,
        watch_seconds: int = WATCH_SECONDS,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        self.scopes, self.grants, self.client = list(scopes), grants, client
        self.watch_seconds, self.backoff = watch_seconds, backoff
        self.isolations: dict[str, dict[str, dict[str, Any]]] = {}  # namespace -> uid -> interlock.index_entry
        self.listed = asyncio.Event()  # every scope listed once (tests; the log)
        self.lists = 0  # LISTs made (the first of each scope included)
        self.failures = 0  # calls that failed, each followed by a backoff
        self._listed: set[str | None] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch(scope), name=f"containment watch {scope or '(all namespaces)'}")
            for scope in self.scopes
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def holder(self, namespace: str) -> str | None:
        """``Context.isolation`` from this watch's view: the isolation that holds ``namespace``."""
        found = holding_isolation(self.isolations.get(namespace, {}).values())
        return None if found is None else str(found["metadata"]["name"])

    # --- what an event does ---------------------------------------------------------------------------------
    def seen(self, event_type: str, body: Mapping[str, Any]) -> None:
        """One isolation as the watch (or its LIST: ADDED) has it: the view follows; a new one that awaits
        containment is contained (begun: not waited for)."""
        metadata = body["metadata"]
        namespace, uid = str(metadata["namespace"]), str(metadata.get("uid"))
        if event_type == "DELETED":
            self.isolations.get(namespace, {}).pop(uid, None)
            isolation.forget_containment(uid)
            return
        self.isolations.setdefault(namespace, {})[uid] = interlock.index_entry(body)
        if event_type == "ADDED" and isolation.awaits_containment(body):
            try:
                isolation.begin_containment(body, isolation=self.holder, grants=self.grants)
            except Exception:  # one isolation's surprise never ends the watch; kopf's path remains
                LOG.exception("%s %s/%s: containment left to kopf's path", isolation.KIND, namespace, metadata["name"])

    def _relisted(self, scope: str | None, items: Sequence[Mapping[str, Any]]) -> None:
        if scope is None:
            self.isolations.clear()
        else:
            self.isolations.pop(scope, None)
        for item in items:
            self.seen("ADDED", item)

    # --- the watch ------------------------------------------------------------------------------------------
    async def _watch(self, scope: str | None) -> None:
        where = scope or "all namespaces"
        version: str | None = None
        wait = self.backoff[0]
        while True:
            try:
                client = await self.client()
                if version is None:
                    listed = await client.list(isolation.EMERGENCY_ISOLATIONS, scope, executor=CONTAINMENT)
                    self.lists += 1
                    version = str(listed["metadata"]["resourceVersion"])
                    self._relisted(scope, [{"kind": isolation.KIND, **item} for item in listed.get("items") or []])
                    self._listed.add(scope)
                    if self._listed >= set(self.scopes):
                        self.listed.set()
                async for event in client.watch(
                    isolation.EMERGENCY_ISOLATIONS,
                    scope,
                    version=version,
                    seconds=self.watch_seconds,
                    executor=CONTAINMENT,
                ):
                    kind, body = str(event.get("type")), event.get("object") or {}
                    if kind == "ERROR":  # 410 Gone (a version too old) or another refusal: list again
                        raise _status_error(body)
                    version = str(body["metadata"]["resourceVersion"])
                    if kind != "BOOKMARK":
                        self.seen(kind, body)
                        # a containment just begun sends its create now, not after the rest of a burst's events
                        # (each one's checks cost ~1 ms: 100 in one read held the first create ~100 ms)
                        await asyncio.sleep(0)
                    wait = self.backoff[0]  # a watch that delivers is a healthy one
            except asyncio.CancelledError:
                raise
            except (ApiException, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as error:
                self.failures += 1
                if isinstance(error, ApiException) and error.status == 410:
                    version = None
                    LOG.info("containment watch (%s): resourceVersion too old; listing again", where)
                else:
                    if isinstance(error, ApiException | ValueError | KeyError):
                        version = None  # a refusal or a garbled answer: start over from a LIST
                    LOG.warning("containment watch (%s): %s; again in %.2fs", where, _describe(error), wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, self.backoff[1])


def _status_error(status: Mapping[str, Any]) -> ApiException:
    error = ApiException(status=int(status.get("code") or 500), reason=str(status.get("reason") or "Error"))
    error.body = json.dumps(dict(status))
    return error


def _describe(error: Exception) -> str:
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}"
    return type(error).__name__


WATCHES: list[ContainmentWatch] = []  # the running operator's (main.py's startup and cleanup)


def start(namespaces: Sequence[str] | None, *, grants: GrantsOf, watch_seconds: int = WATCH_SECONDS) -> bool:
    """main.py's startup: the watches of kopf's scope (``scope_of``); False when there are none."""
    scopes = scope_of(namespaces)
    if scopes is None:
        LOG.info("containment watch: off (the namespaces are patterns or not known); kopf's events contain")
        return False
    watch = ContainmentWatch(scopes, grants=grants, watch_seconds=watch_seconds)
    watch.start()
    WATCHES.append(watch)
    return True


async def stop() -> None:
    """main.py's cleanup: every watch ends (before the containments under way are waited for)."""
    while WATCHES:
        with contextlib.suppress(Exception):
            await WATCHES.pop().stop()
