"""The reconcile contract: one pass, one status write of what changed, failures as conditions and Events."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest
from pydantic import Field

from runbook_operator.clients import kube
from runbook_operator.errors import RunbookError
from runbook_operator.models.common import CamelModel, StatusBase, StatusModel
from runbook_operator.reconcilers import runtime
from runbook_operator.reconcilers.runtime import Context, Reconciler, Result
from tests.fake_api import FakeApi

THINGS = kube.custom_resource("things", "Thing")


class ThingSpec(CamelModel):
    size: int = Field(1, ge=1)


class Inner(StatusModel):
    rows: int | None = None
    tables: int | None = None


class ThingStatus(StatusBase):
    seen_size: int | None = None
    inner: Inner | None = None


def _body(api: FakeApi, spec: dict[str, object], status: dict[str, object] | None = None) -> dict[str, object]:
    return api.put(THINGS, "team-a", {"metadata": {"name": "t"}, "spec": spec, "status": status or {}})


def _pass(reconcile: object) -> Reconciler[ThingSpec, ThingStatus]:
    return Reconciler(THINGS, ThingSpec, ThingStatus, reconcile)  # type: ignore[arg-type]


def test_a_pass_writes_only_the_fields_it_changed_once() -> None:
    api = FakeApi()
    body = _body(api, {"size": 3}, {"phase": "Old", "unknownToThisVersion": "kept", "inner": {"rows": 1, "tables": 2}})

    def reconcile(ctx: Context[ThingSpec, ThingStatus]) -> Result:
        ctx.status.seen_size = ctx.spec.size
        assert ctx.status.inner is not None
        ctx.status.inner.tables = None
        ctx.condition("Ready", "True", "Reconciled")
        return Result.after(30)

    result = runtime.run_pass(Context.of(_pass(reconcile), body, api), _pass(reconcile).reconcile)
    assert result == Result.after(30)
    (write,) = api.writes()
    assert write.subresource == "status"
    patch = write.body["status"]
    assert set(patch) == {"seenSize", "inner", "conditions", "observedGeneration"}
    assert patch["inner"] == {"tables": None}  # a nested removal is a null, the sibling stays untouched
    stored = api.stored(THINGS, "team-a", "t")
    assert stored is not None
    assert stored["status"]["unknownToThisVersion"] == "kept"
    assert stored["status"]["inner"] == {"rows": 1}

    # the same pass again changes nothing, so it writes nothing
    api.calls.clear()
    runtime.run_pass(Context.of(_pass(reconcile), stored, api), _pass(reconcile).reconcile)
    assert api.writes() == []


def test_an_invalid_spec_and_a_refusal_become_ready_false_with_one_event_each() -> None:
    api = FakeApi()
    body = _body(api, {"size": 0})
    result = runtime.run_pass(Context.of(_pass(lambda ctx: ctx.spec), body, api), lambda ctx: Result(ctx.spec.size))
    assert result.error is not None and result.error.reason == "InvalidSpec"
    assert result.requeue_after is None  # waits for the user to fix the spec
    stored = api.stored(THINGS, "team-a", "t")
    assert stored is not None
    (ready,) = stored["status"]["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.size" in ready["message"]
    assert [c.plural for c in api.writes() if c.verb == "create"] == ["events"]

    api.fail_on("get", "configmaps", status=403)

    def reads(ctx: Context[ThingSpec, ThingStatus]) -> Result:
        ctx.api.get(kube.CONFIG_MAPS, ctx.namespace, "x")
        return Result.done()

    result = runtime.run_pass(Context.of(_pass(reads), _body(api, {"size": 1}), api), reads, failures=2)
    assert result.error is not None and result.error.reason == "Forbidden"
    assert result.requeue_after == runtime.backoff(runtime.UNEXPECTED_RETRY, 3)


def test_kopf_endings() -> None:
    import kopf

    runtime.as_kopf(Result.done())
    with pytest.raises(kopf.TemporaryError):
        runtime.as_kopf(Result.after(5))
    with pytest.raises(kopf.PermanentError):
        runtime.as_kopf(Result(error=RunbookError("InvalidSpec", "spec.x: bad")))
    with pytest.raises(kopf.TemporaryError) as retry:
        runtime.as_kopf(Result(error=RunbookError("SecretNotFound", "gone", retry_after=10)), retry=2)
    assert retry.value.delay == 40


def test_blocking_calls_run_in_the_operators_executor() -> None:
    names = asyncio.run(runtime.blocking(lambda: threading.current_thread().name))
    assert names.startswith("runbook")


def test_clock_stops_when_a_pass_is_finished_and_backs_off_after_failures() -> None:
    clocks = runtime.Clocks()
    seen: list[int] = []

    async def reconcile(failures: int) -> Result:
        seen.append(failures)
        if len(seen) < 3:
            return Result(requeue_after=0.01, error=RunbookError("X", "x", retry_after=0.01))
        return Result.stop()

    class Stopped:
        def __bool__(self) -> bool:
            return False

        async def wait(self) -> None:
            await asyncio.sleep(3600)

    asyncio.run(clocks.run(namespace="n", name="x", stopped=Stopped(), reconcile=reconcile))  # type: ignore[arg-type]
    assert seen == [0, 1, 2]


def test_builders_import_nothing_that_does_io() -> None:
    """No builder pulls in a client library or kopf: they turn parsed models into manifests, nothing more."""
    code = (
        "import pkgutil, importlib, sys, runbook_operator.builders as b\n"
        "for m in pkgutil.iter_modules(b.__path__): importlib.import_module(f'runbook_operator.builders.{m.name}')\n"
        "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    listed = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded = set(listed.split())
    assert loaded & {"boto3", "botocore", "gnupg", "psycopg", "redis", "kopf"} == set()


def test_kopf_runs_sync_handlers_in_the_operators_executor_sized_by_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kopf

    from runbook_operator import main

    monkeypatch.setattr(main.metrics, "serve", lambda port: None)
    monkeypatch.setattr(main, "install_redactor", lambda: None)
    monkeypatch.setattr(main.SETTINGS, "max_workers", 7)
    monkeypatch.setattr(runtime.EXECUTOR, "_max_workers", runtime.EXECUTOR._max_workers)  # put back afterwards
    settings = kopf.OperatorSettings()
    main.startup(settings=settings)
    assert settings.execution.executor is runtime.EXECUTOR
    assert runtime.EXECUTOR._max_workers == 7
