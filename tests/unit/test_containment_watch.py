"""The containment watch (reconcilers/containment.py): contains a new EmergencyIsolation on its ADDED event, off
kopf's queues, exactly once with kopf's own path; the interlock and tenancy checks; reconnects."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from kubernetes.client import ApiException

from runbook_operator.builders.isolation import POLICY_NAME
from runbook_operator.clients import kube
from runbook_operator.reconcilers import containment, isolation

NS = "hungryhippaahneties"


def body(name: str = "breach", namespace: str = NS, *, version: str = "1", **status: Any) -> dict[str, Any]:
    spec = {"reason": "test", "incidentId": "INC-1", "network": {"isolate": True}, "evidence": {"capture": False}}
    return {
        "apiVersion": "runbook.dev/v1alpha1",
        "kind": "EmergencyIsolation",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "resourceVersion": version,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": spec,
        "status": status,
    }


class FakeLoop:
    """``kube.LoopCreate`` in small: LISTs answer ``items``; each watch plays the next script of events (an
    exception is raised where it stands; the end of a script ends the watch as the server would); creates
    are recorded, a second one of a name is a 409."""

    def __init__(self, items: list[dict[str, Any]] | None = None) -> None:
        self.items = items or []
        self.scripts: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.lists: list[str | None] = []
        self.watches: list[str] = []
        self.created: list[tuple[str, str]] = []
        self.create_delay = 0.0

    async def list(self, resource: kube.Resource, namespace: str | None, *, executor: Any) -> dict[str, Any]:
        self.lists.append(namespace)
        return {"metadata": {"resourceVersion": f"list-{len(self.lists)}"}, "items": self.items}

    async def watch(
        self, resource: kube.Resource, namespace: str | None, *, version: str, seconds: int, executor: Any
    ) -> AsyncIterator[dict[str, Any]]:
        self.watches.append(version)
        for event in await self.scripts.get():
            if isinstance(event, BaseException):
                raise event
            yield event

    async def create(self, resource: kube.Resource, namespace: str, payload: bytes, *, executor: Any) -> bool:
        await asyncio.sleep(self.create_delay)
        name = json.loads(payload)["metadata"]["name"]
        if (namespace, name) in self.created:
            return False
        self.created.append((namespace, name))
        return True


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """isolatedAt writes (``record_first_containment``) by isolation name, instead of API calls."""
    names: list[str] = []
    monkeypatch.setattr(isolation, "record_first_containment", lambda _api, b: names.append(b["metadata"]["name"]))
    monkeypatch.setattr(isolation, "SETTLE_QUIET", 0.0)
    yield names


def run_with(loop_client: FakeLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    async def client() -> kube.LoopCreate:
        return loop_client  # type: ignore[return-value]  # the fake has what the watch and the create call

    monkeypatch.setattr(isolation, "loop_client", client)


async def until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def watch(fake: FakeLoop, scopes: list[str | None] | None = None, **kwargs: Any) -> containment.ContainmentWatch:
    async def client() -> kube.LoopCreate:
        return fake  # type: ignore[return-value]

    return containment.ContainmentWatch(scopes or [None], grants=lambda _: (), client=client, **kwargs)


def no_holder(_: str) -> str | None:
    return None


def test_added_is_contained_at_once_and_kopfs_event_finds_it_done(
    monkeypatch: pytest.MonkeyPatch, recorded: list[str]
) -> None:
    fake = FakeLoop()
    run_with(fake, monkeypatch)
    new = body()

    async def scenario() -> None:
        w = watch(fake)
        w.start()
        await fake.scripts.put([{"type": "ADDED", "object": new}])
        await until(lambda: fake.created)
        await isolation.contain_new(new, isolation=no_holder, grants=lambda _: ())  # kopf's event, later
        await until(lambda: recorded)
        await w.stop()

    asyncio.run(scenario())
    assert fake.created == [(NS, POLICY_NAME)]
    assert recorded == ["breach"]
    assert fake.lists == [None] and fake.watches[0] == "list-1"  # listed cluster-wide, watched from the LIST


def test_kopfs_event_first_then_the_watch_waits_for_it(monkeypatch: pytest.MonkeyPatch, recorded: list[str]) -> None:
    fake = FakeLoop()
    fake.create_delay = 0.1
    run_with(fake, monkeypatch)
    new = body()

    async def scenario() -> None:
        w = watch(fake)
        w.start()
        kopf = asyncio.create_task(isolation.contain_new(new, isolation=no_holder, grants=lambda _: ()))
        await asyncio.sleep(0.01)
        await fake.scripts.put([{"type": "ADDED", "object": new}])
        await kopf
        await w.stop()

    asyncio.run(scenario())
    assert fake.created == [(NS, POLICY_NAME)] and recorded == ["breach"]


def test_a_burst_is_one_create_per_isolation_whichever_path_comes_first(
    monkeypatch: pytest.MonkeyPatch, recorded: list[str]
) -> None:
    fake = FakeLoop()
    fake.create_delay = 0.02
    run_with(fake, monkeypatch)
    bodies = [body(namespace=f"ns-{i}") for i in range(100)]

    async def scenario() -> None:
        w = watch(fake)
        w.start()
        await until(lambda: fake.watches)
        kopf = [
            asyncio.create_task(isolation.contain_new(b, isolation=no_holder, grants=lambda _: ())) for b in bodies[::3]
        ]
        await fake.scripts.put([{"type": "ADDED", "object": b} for b in bodies])
        kopf += [
            asyncio.create_task(isolation.contain_new(b, isolation=no_holder, grants=lambda _: ())) for b in bodies
        ]
        await asyncio.gather(*kopf)
        await w.stop()

    asyncio.run(scenario())
    assert sorted(fake.created) == sorted((f"ns-{i}", POLICY_NAME) for i in range(100))
    assert sorted(recorded) == ["breach"] * 100


def test_a_409_is_done_and_left_to_the_pass(monkeypatch: pytest.MonkeyPatch, recorded: list[str]) -> None:
    fake = FakeLoop()
    fake.created.append((NS, POLICY_NAME))  # a hand-made emergency-isolate: the pass adopts it
    run_with(fake, monkeypatch)
    new = body()

    async def scenario() -> None:
        w = watch(fake)
        w.start()
        await fake.scripts.put([{"type": "ADDED", "object": new}])
        await until(lambda: new["metadata"]["uid"] in isolation._FIRST)
        await isolation.contain_new(new, isolation=no_holder, grants=lambda _: ())
        await w.stop()

    asyncio.run(scenario())
    assert fake.created == [(NS, POLICY_NAME)] and recorded == []


def test_the_interlock_from_the_watchs_own_view(monkeypatch: pytest.MonkeyPatch, recorded: list[str]) -> None:
    holder = body("first", phase="Isolated")
    fake = FakeLoop(items=[holder])
    run_with(fake, monkeypatch)
    second = body("second")

    async def scenario() -> containment.ContainmentWatch:
        w = watch(fake)
        w.start()
        await fake.scripts.put([{"type": "ADDED", "object": second}])
        await until(lambda: "second" in {e["metadata"]["name"] for e in w.isolations.get(NS, {}).values()})
        await asyncio.sleep(0.05)
        await w.stop()
        return w

    w = asyncio.run(scenario())
    assert w.holder(NS) == "first"
    assert fake.created == [] and recorded == []
    assert second["metadata"]["uid"] not in isolation._FIRST  # kopf's path may look again


def test_the_tenancy_rules_first(monkeypatch: pytest.MonkeyPatch, recorded: list[str]) -> None:
    fake = FakeLoop()
    run_with(fake, monkeypatch)
    breach = body()
    breach["spec"]["evidence"] = {
        "capture": True,
        "destination": {
            "bucket": "e",
            "endpoint": "https://s3.attacker.example",
            "credentialsSecretRef": {"name": "s"},
        },
        "encryption": {"gpg": {"recipientsConfigMapRef": {"name": "keys", "key": "team.asc"}}},
    }

    async def scenario() -> None:
        w = watch(fake)
        w.start()
        await fake.scripts.put([{"type": "ADDED", "object": breach}])
        await until(lambda: NS in w.isolations)
        await asyncio.sleep(0.05)
        await w.stop()

    asyncio.run(scenario())
    assert fake.created == [] and breach["metadata"]["uid"] not in isolation._FIRST


def test_only_added_and_listed_ones_awaiting_containment(monkeypatch: pytest.MonkeyPatch, recorded: list[str]) -> None:
    pending = body("pending", namespace="a")  # created while no operator ran: found by the LIST
    done = body("done", namespace="b", phase="Isolated", isolatedAt="2026-01-01T00:00:01Z")
    fake = FakeLoop(items=[pending, done])
    run_with(fake, monkeypatch)
    modified = body("modified", namespace="c")

    async def scenario() -> None:
        w = watch(fake)
        w.start()
        await fake.scripts.put([{"type": "MODIFIED", "object": modified}])
        await until(lambda: "c" in w.isolations)
        await until(lambda: recorded)
        await w.stop()

    asyncio.run(scenario())
    assert fake.created == [("a", POLICY_NAME)] and recorded == ["pending"]


def test_reconnects_from_its_version_lists_again_on_410_and_backs_off(
    monkeypatch: pytest.MonkeyPatch, recorded: list[str]
) -> None:
    fake = FakeLoop()
    run_with(fake, monkeypatch)
    late = body("late", version="9")

    async def scenario() -> containment.ContainmentWatch:
        w = watch(fake, backoff=(0.01, 0.04))
        w.start()
        bookmark = {"type": "BOOKMARK", "object": {"kind": "EmergencyIsolation", "metadata": {"resourceVersion": "7"}}}
        await fake.scripts.put([bookmark])  # the server ends the watch: again from 7
        gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
        await fake.scripts.put([gone])  # too old: LIST again, watch from its version
        await fake.scripts.put([aiohttp.ServerDisconnectedError()])  # backoff, again from the same version
        await fake.scripts.put([TimeoutError()])
        await fake.scripts.put([{"type": "ADDED", "object": late}])
        await until(lambda: recorded)
        await w.stop()
        return w

    w = asyncio.run(scenario())
    assert fake.watches == ["list-1", "7", "list-2", "list-2", "list-2", "9"]  # then on from the ADDED
    assert fake.lists == [None, None] and w.lists == 2 and w.failures == 3
    assert fake.created == [(NS, POLICY_NAME)] and recorded == ["late"]


def test_a_refused_list_is_retried_with_bounded_backoff(monkeypatch: pytest.MonkeyPatch, recorded: list[str]) -> None:
    fake = FakeLoop()
    refusals = [ApiException(status=403, reason="Forbidden")] * 5
    original = fake.list

    async def flaky(resource: kube.Resource, namespace: str | None, *, executor: Any) -> dict[str, Any]:
        if refusals:
            raise refusals.pop()
        return await original(resource, namespace, executor=executor)

    monkeypatch.setattr(fake, "list", flaky)
    run_with(fake, monkeypatch)

    async def scenario() -> containment.ContainmentWatch:
        w = watch(fake, backoff=(0.01, 0.02))
        w.start()
        async with asyncio.timeout(2):
            await w.listed.wait()
        await w.stop()
        return w

    w = asyncio.run(scenario())
    assert w.failures == 5 and w.lists == 1


def test_one_watch_per_namespace_when_limited(monkeypatch: pytest.MonkeyPatch, recorded: list[str]) -> None:
    fake = FakeLoop()
    run_with(fake, monkeypatch)

    async def scenario() -> None:
        w = watch(fake, scopes=["a", "b"])
        w.start()
        async with asyncio.timeout(2):
            await w.listed.wait()
        await w.stop()

    asyncio.run(scenario())
    assert sorted(fake.lists, key=str) == ["a", "b"]


def test_scope_follows_kopfs() -> None:
    assert containment.scope_of([]) == [None]
    assert containment.scope_of(["a", "b", "a"]) == ["a", "b"]
    assert containment.scope_of(["team-*"]) is None and containment.scope_of(["!kube-system"]) is None
    assert containment.scope_of(None) is None


def test_deleted_forgets(monkeypatch: pytest.MonkeyPatch, recorded: list[str]) -> None:
    fake = FakeLoop()
    run_with(fake, monkeypatch)
    new = body()

    async def scenario() -> containment.ContainmentWatch:
        w = watch(fake)
        w.start()
        await fake.scripts.put([{"type": "ADDED", "object": new}, {"type": "DELETED", "object": new}])
        await until(lambda: fake.created and new["metadata"]["uid"] not in isolation._FIRST)
        await w.stop()
        return w

    w = asyncio.run(scenario())
    assert w.isolations[NS] == {}
