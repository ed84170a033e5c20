"""The only module with kopf decorators. Handlers parse, delegate to a reconciler and return nothing
(kopf would copy a return value into status): every decision lives in ``reconcilers/``."""

from __future__ import annotations

from typing import Any

import kopf

from . import metrics
from .logs import install_redactor
from .models import GROUP, VERSION
from .reconcilers import isolation, rotation, scaling
from .settings import Settings, configure_kopf

SETTINGS = Settings.from_env()


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure_kopf(settings, SETTINGS)
    install_redactor()
    metrics.serve(SETTINGS.metrics_port)


@kopf.on.probe(id="handlers")
def probe_handlers(**_: Any) -> str:
    return "ok"


# --- ScalingProfile ---
SCALING_PROFILES = (GROUP, VERSION, "scalingprofiles")


@kopf.daemon(*SCALING_PROFILES, cancellation_timeout=60)
async def scaling_profile_clock(body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
    await scaling.run_clock(body, stopped=stopped)


@kopf.on.update(*SCALING_PROFILES, field="spec")
async def scaling_profile_changed(body: kopf.Body, **_: Any) -> None:
    scaling.CLOCKS.wake(body.metadata.namespace, body.metadata.name)


@kopf.on.delete(*SCALING_PROFILES)
async def scaling_profile_deleted(body: kopf.Body, **_: Any) -> None:
    await scaling.finalize(body)


@kopf.on.event(GROUP, VERSION, "emergencyisolations")
async def scaling_profiles_follow_isolation(body: kopf.Body, **_: Any) -> None:
    scaling.CLOCKS.wake(body.metadata.namespace)


# --- EmergencyIsolation ---
# Every pass is level-based (reads the cluster, converges), so create, resume and spec changes share one
# handler; deletion goes through kopf's finalizer, which holds the object until the release succeeded, also
# when it was deleted while the operator was down. A timer puts back a policy removed by hand.
EMERGENCY_ISOLATIONS = (GROUP, VERSION, "emergencyisolations")


@kopf.on.resume(*EMERGENCY_ISOLATIONS)
@kopf.on.create(*EMERGENCY_ISOLATIONS)
@kopf.on.update(*EMERGENCY_ISOLATIONS, field="spec")
def emergency_isolation(body: kopf.Body, **_: Any) -> None:
    isolation.reconcile(body)


@kopf.timer(*EMERGENCY_ISOLATIONS, interval=10, idle=5)
def emergency_isolation_guard(body: kopf.Body, **_: Any) -> None:
    isolation.guard(body)


@kopf.on.delete(*EMERGENCY_ISOLATIONS)
def emergency_isolation_deleted(body: kopf.Body, **_: Any) -> None:
    isolation.release_deleted(body)


# --- SecretRotation ---
# One clock per resource sleeps until the next rotation is due; spec changes (rotateNow) and changes of an
# EmergencyIsolation in the namespace (the interlock) wake it.
SECRET_ROTATIONS = (GROUP, VERSION, "secretrotations")


@kopf.daemon(*SECRET_ROTATIONS, cancellation_timeout=60)
async def secret_rotation_clock(body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any) -> None:
    await rotation.run_clock(body, stopped=stopped, logger=logger)


@kopf.on.update(*SECRET_ROTATIONS, field="spec")
async def secret_rotation_changed(body: kopf.Body, **_: Any) -> None:
    rotation.CLOCKS.wake(body.metadata.namespace, body.metadata.name)


@kopf.on.event(*EMERGENCY_ISOLATIONS)
async def secret_rotations_follow_isolation(body: kopf.Body, **_: Any) -> None:
    rotation.CLOCKS.wake(body.metadata.namespace)
