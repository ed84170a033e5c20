"""The only module with kopf decorators. Handlers parse, delegate to a reconciler and return nothing
(kopf would copy a return value into status): every decision lives in ``reconcilers/``."""

from __future__ import annotations

from typing import Any

import kopf

from . import metrics
from .logs import install_redactor
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
