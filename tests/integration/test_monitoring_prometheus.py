"""A real Prometheus (Debian's package) scrapes a running operator with deploy/monitoring/'s rules loaded as
shipped: a BackupPolicy whose backup fails makes RunbookBackupFailed fire in Prometheus' own API, the
policy's schedule interval is exported, and every dashboard query is accepted by Prometheus' query API.
Only the scrape and evaluation intervals are shortened (1 s)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from tests.backup_support import new_bucket
from tests.helpers import OperatorProcess
from tests.integration.test_backup_policy import POLICY, Cluster, pg_policy_spec
from tests.monitoring.test_monitoring import query_panels, write_rule_file
from tests.services import GpgKeyring, Postgres, S3Server

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tools" / "localcluster"))

import localcluster  # noqa: E402 - found through the sys.path entry above

pytestmark = pytest.mark.integration
JOB = "runbook-operator-metrics"  # the job name a ServiceMonitor gives the scrape: the Service's name


class Prometheus:
    def __init__(self, directory: Path, metrics_port: int) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed: tools/dev/setup.sh installs Debian's prometheus package")
        self.port = localcluster.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rules = write_rule_file(directory)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)["data"]
        except OSError:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited: {localcluster.tail(self.log)}")
            return None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def operator_with_metrics(operator_kubeconfig: Path, namespace: str, tmp_path: Path) -> Iterator[int]:
    """The operator as its own process, serving /metrics on a free port; yields the port."""
    port = localcluster.free_port()
    operator = OperatorProcess(operator_kubeconfig, namespace, tmp_path / "operator.log")
    operator.env["RUNBOOK_METRICS_PORT"] = str(port)
    operator.start()
    try:
        yield port
    finally:
        operator.stop()


@pytest.fixture
def prometheus(operator_with_metrics: int, tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path, operator_with_metrics)
    try:
        yield server
    finally:
        server.stop()


def test_a_failed_backup_fires_in_a_real_prometheus(
    api: kubernetes.client.ApiClient,
    namespace: str,
    crds_installed: list[str],
    postgres: Postgres,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    prometheus: Prometheus,
    wait_for: Callable[..., Any],
) -> None:
    cluster = Cluster(api, namespace)
    cluster.secret("db-credentials", {"username": "reader", "password": "reader-password-31"})
    cluster.secret(
        "backup-s3-credentials",
        {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
    )
    cluster.config_map("backup-gpg-recipients", {"team.asc": gpg_keyring.public_key})
    bucket = new_bucket(s3_server)
    cluster.create_policy(pg_policy_spec(postgres, "appdb", s3_server, bucket))
    cronjob = wait_for(cluster.cronjob, timeout=90, what="the CronJob")

    # The operator is scraped and the rules are loaded, and nothing fires yet for the policy.
    def target_up() -> bool:
        targets = prometheus.api("targets") or {"activeTargets": []}
        return any(t["labels"]["job"] == JOB and t["health"] == "up" for t in targets["activeTargets"])

    wait_for(target_up, timeout=60, what="Prometheus to scrape the operator")
    groups = wait_for(lambda: (prometheus.api("rules") or {}).get("groups"), timeout=30, what="the rules")
    assert {g["name"] for g in groups} == {"runbook-critical", "runbook-key-metrics", "runbook-operator"}
    interval = wait_for(
        lambda: (
            prometheus.api("query", query=f'runbook_backup_schedule_interval_seconds{{namespace="{namespace}"}}') or {}
        ).get("result"),
        timeout=60,
        what="the policy's schedule interval",
    )
    assert interval[0]["metric"]["policy"] == POLICY and float(interval[0]["value"][1]) == 6 * 3600

    def backup_failed() -> list[dict[str, Any]]:
        found = (prometheus.api("alerts") or {"alerts": []})["alerts"]
        return [
            a
            for a in found
            if a["labels"]["alertname"] == "RunbookBackupFailed" and a["labels"].get("namespace") == namespace
        ]

    assert backup_failed() == []

    # A scheduled run fails (the test plays the Job controller: no kubelet here).
    job = cluster.scheduled_job(cronjob, datetime.now(UTC).replace(second=0, microsecond=0))
    wait_for(lambda: cluster.status().get("lastScheduleTime"), timeout=30, what="lastScheduleTime")
    cluster.finish_job(job, succeeded=False)
    wait_for(lambda: (cluster.status().get("lastFailure") or {}).get("job") == job, timeout=60, what="lastFailure")

    alerts = wait_for(
        lambda: [a for a in backup_failed() if a["state"] == "firing"], timeout=60, what="RunbookBackupFailed firing"
    )
    labels = alerts[0]["labels"]
    assert labels == {
        "alertname": "RunbookBackupFailed",
        "namespace": namespace,
        "policy": POLICY,
        "source": "postgresql",
        "severity": "warning",
    }
    assert alerts[0]["annotations"]["summary"] == f"The newest backup of BackupPolicy {namespace}/{POLICY} failed"
    failures = prometheus.api("query", query=f'runbook_backup_failures_total{{namespace="{namespace}"}}')["result"]
    assert float(failures[0]["value"][1]) == 1

    # The operator is up: RunbookOperatorDown is not even pending.
    assert not [a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] == "RunbookOperatorDown"]

    # Every dashboard query is valid PromQL to Prometheus itself, and the backup row shows the failure.
    for panel in query_panels():
        for target in panel["targets"]:
            expr = target["expr"].replace("$namespace", namespace)
            assert prometheus.api("query", query=expr) is not None, f"{panel['title']}: Prometheus refused {expr}"
    failures_panel = next(p for p in query_panels() if p["title"] == "Backup failures (1 h)")
    shown = prometheus.api("query", query=failures_panel["targets"][0]["expr"].replace("$namespace", namespace))
    assert [r["metric"]["policy"] for r in shown["result"]] == [POLICY]
