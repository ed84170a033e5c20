"""SecretRotation's guards on the Secret it writes (issue 13 item 4), one pass at a time against the in-memory
API and a fake Target: a Secret a rotation must not write is refused before anything changes (no pending
Secret, the target untouched, the Secret as it was), with Ready=False naming spec.secretRef.name; the Secret a
rotation publishes to carries runbook.dev/rotated-by, which another rotation then respects."""

from __future__ import annotations

from typing import Any

import pytest

from runbook_operator.builders import rotation as build
from runbook_operator.clients import kube
from tests.unit.test_rotation_steps import NAME, NS, OLD, SECRET, World, b64


def refused_before_any_change(world: World, why: str) -> None:
    world.step()
    status = world.status()
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "SecretNotRotatable")
    assert ready["message"].startswith(f"spec.secretRef.name: Secret {SECRET} is not rotated: {why}")
    assert "rotationId" not in status  # never started
    assert world.target.calls == [] and world.target.passwords == {OLD}
    assert world.secret(build.pending_secret_name(NAME)) is None
    assert world.secret()["password"] == OLD  # type: ignore[index]
    assert not [c for c in world.api.writes() if c.plural == "secrets"]


@pytest.mark.parametrize(
    "kind",
    [
        "kubernetes.io/tls",
        "kubernetes.io/service-account-token",
        "kubernetes.io/dockerconfigjson",
        "kubernetes.io/dockercfg",
        "bootstrap.kubernetes.io/token",
    ],
)
def test_a_secret_of_another_type_is_refused(kind: str) -> None:
    world = World()
    world.api.put(kube.SECRETS, NS, {"metadata": {"name": SECRET}, "type": kind, "data": {"password": b64(OLD)}})
    refused_before_any_change(world, f"its type is {kind}")


def test_a_secret_owned_by_another_object_is_refused() -> None:
    world = World()
    owner = {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "name": "web", "uid": "c-1"}
    secret = {"metadata": {"name": SECRET, "ownerReferences": [owner]}, "data": {"password": b64(OLD)}}
    world.api.put(kube.SECRETS, NS, secret)
    refused_before_any_change(world, "it is owned by Certificate web (ownerReferences)")


def test_a_secret_another_rotation_manages_is_refused() -> None:
    world = World()
    secret = {"metadata": {"name": SECRET, "annotations": {build.ROTATED_BY: "other"}}, "data": {"password": b64(OLD)}}
    world.api.put(kube.SECRETS, NS, secret)
    refused_before_any_change(world, "SecretRotation other rotates it already")


def test_publishing_marks_the_secret_and_deletion_releases_it() -> None:
    world = World()
    world.run_to_done()
    stored: dict[str, Any] | None = world.api.stored(kube.SECRETS, NS, SECRET)
    assert stored is not None and stored["metadata"]["annotations"][build.ROTATED_BY] == NAME
    assert world.publications() == 1  # the mark travels with the password, in the one write
    world.step(finalizing=True)
    stored = world.api.stored(kube.SECRETS, NS, SECRET)
    assert stored is not None and build.ROTATED_BY not in (stored["metadata"].get("annotations") or {})
