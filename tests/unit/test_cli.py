"""`runbook-operator run`: the flags, else the RUNBOOK_* settings the README documents."""

from __future__ import annotations

import pytest

from runbook_operator.cli import build_parser, run_scope
from runbook_operator.settings import Settings


def test_namespaces_and_health_port_come_from_the_environment_unless_flags_say_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNBOOK_NAMESPACES", "hungryhippaahneties, team-b")
    monkeypatch.setenv("RUNBOOK_HEALTH_PORT", "8181")
    settings = Settings.from_env()
    assert run_scope(build_parser().parse_args(["run"]), settings) == (["hungryhippaahneties", "team-b"], 8181)
    flags = build_parser().parse_args(["run", "-n", "only", "--health-port", "0"])
    assert run_scope(flags, settings) == (["only"], 0)


def test_by_default_every_namespace_and_port_8080() -> None:
    assert run_scope(build_parser().parse_args(["run"]), Settings()) == ([], 8080)
