"""`make run`'s script (tools/dev/run.sh) on a control plane that has never seen the CRDs, as a new user's
first run is: the samples' prerequisites all exist, and the operator starts without an ERROR line."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from tests.helpers import ROOT, load_samples

import localcluster

pytestmark = pytest.mark.integration
NAMESPACE = "hungryhippaahneties"


def references(node: Any) -> Iterator[tuple[str, str, str | None]]:
    """("Secret" | "ConfigMap", name, key or None) for every reference in a sample's spec."""
    if isinstance(node, dict):
        for field, value in node.items():
            if isinstance(value, dict) and "name" in value and field.endswith(("SecretRef", "ConfigMapRef")):
                kind = "ConfigMap" if field.endswith("ConfigMapRef") else "Secret"
                yield kind, value["name"], value.get("key")
            yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[localcluster.LocalCluster]:
    with localcluster.LocalCluster(tmp_path / "state") as cluster:
        yield cluster


def test_run_script_prepares_every_sample_reference_and_starts_without_errors(
    fresh_cluster: localcluster.LocalCluster, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "KUBECONFIG": str(fresh_cluster.kubeconfig),
        "PATH": f"{localcluster.bin_dir()}:{os.environ['PATH']}",
        "RUNBOOK_METRICS_PORT": "0",
        "LOG_FORMAT": "plain",
    }
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen(
            [str(ROOT / "tools/dev/run.sh")],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "prerequisites: namespace" not in log.read_text() and time.monotonic() < deadline:
            assert run.poll() is None, log.read_text()
            time.sleep(0.5)
        assert "prerequisites: namespace" in log.read_text(), log.read_text()
        time.sleep(15)  # the operator's start: login, the first LISTs and watches of every kind
        assert run.poll() is None, log.read_text()
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(30)
    output = log.read_text()
    assert [line for line in output.splitlines() if "ERROR" in line] == [], output

    api = kubernetes.config.new_client_from_config(config_file=str(fresh_cluster.kubeconfig))
    core = kubernetes.client.CoreV1Api(api)
    missing = []
    for sample in load_samples().values():
        for kind, name, key in references(sample.get("spec")):
            read = core.read_namespaced_secret if kind == "Secret" else core.read_namespaced_config_map
            try:
                data = read(name, NAMESPACE).data or {}
            except kubernetes.client.ApiException as error:
                missing.append(f"{kind} {name}: HTTP {error.status}")
                continue
            if key is not None and key not in data:
                missing.append(f"{kind} {name} has no key {key}")
    assert missing == []
    # The TLS Secret has the shape a client certificate needs too.
    assert set(core.read_namespaced_secret("redis-tls", NAMESPACE).data) == {"ca.crt", "tls.crt", "tls.key"}
