"""deploy/monitoring/: promtool checks and unit-tests every alert rule (each fires on a series that should
fire and stays silent on one that should not), the kustomize Component renders, and the Grafana dashboard
passes a lint of what Grafana's dashboard-linter checks (its Go module cannot be fetched here): unique panel
ids, no overlapping panels, the datasource variable on every panel and target, the namespace variable in
every query of a namespaced metric, PromQL that Prometheus parses (promtool, as recording rules), and only
metrics the operator or the runbook exports. promtool comes from Debian's `prometheus` package
(tools/dev/setup.sh installs it); without it these tests fail, they are never skipped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

import runbook_operator.metrics  # noqa: F401 - registers the operator's metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
MONITORING = REPO_ROOT / "deploy" / "monitoring"
TESTS = Path(__file__).parent
RULE_TESTS = sorted(TESTS.glob("*.test.yaml"))

# The metrics the runbook's Prometheus queries, alert rules and key-metric table use (RUNBOOK.md
# "Monitoring & Alerting"), as exported by kube-state-metrics, cAdvisor, the kubelet, postgres_exporter,
# redis_exporter, cert-manager and the application; `up` is Prometheus' own.
RUNBOOK_METRICS = {
    "container_cpu_usage_seconds_total",
    "container_memory_working_set_bytes",
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "pg_stat_activity_count",
    "redis_memory_used_bytes",
    "authentication_failures_total",
    "kube_pod_container_status_restarts_total",
    "pg_up",
    "certmanager_certificate_expiration_timestamp_seconds",
    "kube_pod_container_resource_limits",
    "kubelet_volume_stats_used_bytes",
    "kubelet_volume_stats_capacity_bytes",
    "up",
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: tools/dev/setup.sh installs Debian's prometheus package")
    return found


def rule_groups() -> list[dict[str, Any]]:
    document = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert document["kind"] == "PrometheusRule"
    groups: list[dict[str, Any]] = document["spec"]["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rule_groups() for rule in group["rules"]}


def write_rule_file(directory: Path) -> Path:
    """The PrometheusRule's spec as the plain rule file Prometheus and promtool read."""
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    result = run(promtool(), "check", "rules", str(write_rule_file(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    write_rule_file(tmp_path)
    for test in RULE_TESTS:
        shutil.copy(test, tmp_path / test.name)
    result = run(promtool(), "test", "rules", *(test.name for test in RULE_TESTS), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_every_rule_has_a_firing_and_a_silent_test() -> None:
    fires: dict[str, int] = {}
    silent: dict[str, int] = {}
    for test in RULE_TESTS:
        for group in yaml.safe_load(test.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                counts = fires if case.get("exp_alerts") else silent
                counts[case["alertname"]] = counts.get(case["alertname"], 0) + 1
    names = set(alerts())
    assert not (set(fires) | set(silent)) - names, "tests of alerts that do not exist"
    missing = {
        name: (fires.get(name, 0), silent.get(name, 0)) for name in names if not fires.get(name) or not silent.get(name)
    }
    assert not missing, f"(firing, silent) test counts: {missing}"


def test_the_runbooks_alerts_are_kept_as_the_runbook_has_them() -> None:
    rules = alerts()
    expected = {  # alert: (for, labels, threshold text in the expression)
        "PodCrashLooping": ("5m", {"severity": "critical"}, "> 0"),
        "HighErrorRate": ("5m", {"severity": "critical"}, "> 0.05"),
        "DatabaseDown": ("1m", {"severity": "critical"}, "== 0"),
        "HighAuthFailures": ("2m", {"severity": "critical", "compliance": "hipaa"}, "* 60 > 10"),
        "CertificateExpiringSoon": ("1h", {"severity": "warning"}, "< 604800"),
    }
    for name, (duration, labels, threshold) in expected.items():
        assert rules[name]["for"] == duration
        assert rules[name]["labels"] == labels
        assert threshold in rules[name]["expr"]
        assert "hungryhippaahneties" not in rules[name]["expr"]  # parameterised: the namespace label is kept


def kubectl() -> str:
    sys.path.insert(0, str(REPO_ROOT / "tools" / "localcluster"))
    import localcluster

    path = localcluster.bin_dir() / "kubectl"
    if not path.is_file():
        pytest.fail(f"{path} is missing: `make cluster-build` builds it")
    return str(path)


def test_the_component_renders_with_the_install(tmp_path: Path) -> None:
    # kustomize only loads files below the kustomization root by default: render from a copy of deploy/.
    deploy = tmp_path / "deploy"
    shutil.copytree(REPO_ROOT / "deploy", deploy)
    shutil.copytree(REPO_ROOT / "crds", tmp_path / "crds")
    (deploy / "kustomization.yaml").write_text(
        (REPO_ROOT / "deploy" / "kustomization.yaml").read_text() + "components:\n  - monitoring\n"
    )
    result = run(kubectl(), "kustomize", str(deploy))
    assert result.returncode == 0, result.stderr
    objects = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}
    monitor = objects["ServiceMonitor", "runbook-operator"]
    service = objects["Service", "runbook-operator-metrics"]
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert {p["name"] for p in service["spec"]["ports"]} >= {e["port"] for e in monitor["spec"]["endpoints"]}
    assert objects["PrometheusRule", "runbook-operator"]["spec"]["groups"] == rule_groups()
    dashboard = objects["ConfigMap", "runbook-operator-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["runbook-operator.json"]) == json.loads(
        (MONITORING / "dashboard.json").read_text()
    )


# --- the dashboard ---------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((MONITORING / "dashboard.json").read_text())
    return loaded


def query_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and literals left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text))
    return names - PROMQL_WORDS


def operator_metrics() -> dict[str, tuple[str, ...]]:
    """Every sample name the operator's registry can export, with the metric's label names."""
    registry = prometheus_client.REGISTRY._names_to_collectors  # no public listing exists
    return {name: tuple(getattr(collector, "_labelnames", ())) for name, collector in registry.items()}


def test_dashboard_structure() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["type"] == "query"
    assert variables["namespace"]["datasource"]["uid"] == "${datasource}"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
    assert {"Request Rate", "Error Rate", "Response Time (p99)"} <= {p["title"] for p in panels}
    rows = {p["title"].split()[0] for p in panels if p["type"] == "row"}
    assert {"BackupPolicy", "BackupRestore", "SecretRotation", "EmergencyIsolation", "ScalingProfile"} <= rows
    for panel in query_panels():
        assert panel["type"] in ("timeseries", "stat", "table", "gauge", "bargauge"), "no deprecated panel types"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs))


def test_dashboard_queries_name_exported_metrics_and_use_the_namespace() -> None:
    exported = operator_metrics()
    known = set(exported) | RUNBOOK_METRICS
    for panel in query_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            names = metric_names(expr)
            assert names, f"{panel['title']}: no metric in {expr}"
            assert names <= known, (
                f"{panel['title']}: {names - known} is exported by neither the operator nor the runbook"
            )
            namespaced = {n for n in names if n not in exported or "namespace" in exported[n]} - {"up"}
            for name in namespaced:
                assert re.search(rf'{name}\{{[^}}]*namespace="\$namespace"', expr), (
                    f"{panel['title']}: {name} without $namespace"
                )


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule, with the variables given values)."""
    rules = [
        {
            "record": f"dashboard:panel_{panel['id']}_{target['refId']}",
            "expr": target["expr"].replace("$namespace", "ns"),
        }
        for panel in query_panels()
        for target in panel["targets"]
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool(), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
