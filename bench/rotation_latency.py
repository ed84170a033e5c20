"""What crash safety costs a SecretRotation.

Measures, over N runs against a real PostgreSQL and API server, the time from changing ``rotateNow`` to the
rotation being recorded Done (single strategy, no restart targets: generate into the pending Secret, ALTER
ROLE with a SCRAM verifier, verify a login, publish, retire, a status write after every step), and as the
baseline, in the same run and interleaved, the runbook's manual sequence done directly by one client: a
new password, ALTER ROLE, a login, one write of the Secret. The operator runs as its own process.

    .venv/bin/python bench/rotation_latency.py [--kubeconfig PATH] [--runs 20]

Without --kubeconfig (or $RUNBOOK_BENCH_KUBECONFIG) a local control plane is started for the run.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import kubernetes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.services import Postgres  # noqa: E402

from isolation_latency import cluster_kubeconfig, install_crds, percentile  # noqa: E402
from runbook_operator.clients import postgres as pg  # noqa: E402
from runbook_operator.models import GROUP, VERSION  # noqa: E402

PLURAL = "secretrotations"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", default=os.environ.get("RUNBOOK_BENCH_KUBECONFIG"))
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    with cluster_kubeconfig(args.kubeconfig) as kubeconfig, Postgres() as server:
        api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
        install_crds(api)
        namespace = f"bench-rotation-{uuid.uuid4().hex[:6]}"
        core.create_namespace({"metadata": {"name": namespace}})
        # the local PostgreSQL (127.0.0.1, no TLS) as a cluster administrator's grant allows it
        grant = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RunbookGrant",
            "metadata": {"name": namespace},
            "spec": {
                "namespaces": [namespace],
                "hosts": [{"host": server.host, "port": server.port}],
                "plaintextConnections": True,
            },
        }
        custom.create_cluster_custom_object(GROUP, VERSION, "runbookgrants", grant)
        role, manual_role = "bench_app", "bench_manual"
        with server.connect() as admin:
            for name in (role, manual_role):
                admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'initial-password'")

        def secret(name: str, data: dict[str, str]) -> None:
            encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "data": encoded})

        secret("admin", {"username": server.superuser, "password": server.password})
        secret("db", {"password": "initial-password"})
        secret("manual", {"password": "initial-password"})
        log = Path(tempfile.mkstemp(prefix="bench-operator-", suffix=".log")[1])
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "RUNBOOK_METRICS_PORT": "0"}
        command = [sys.executable, "-m", "runbook_operator.cli", "run", "--namespace", namespace, "--health-port", "0"]
        with log.open("wb") as out:
            operator = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "SecretRotation",
            "metadata": {"name": "bench"},
            "spec": {
                "secretRef": {"name": "db", "key": "password"},
                "target": {
                    "postgresql": {
                        "host": server.host,
                        "port": server.port,
                        "database": "postgres",
                        "user": role,
                        "adminSecretRef": {"name": "admin"},
                        "insecurePlaintext": True,
                    }
                },
            },
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

        def operator_run(token: str) -> float:
            start = time.monotonic()
            patch = {"spec": {"rotateNow": token}}
            custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "bench", patch)
            deadline = start + 60
            while True:
                status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "bench").get("status")
                if status and status.get("rotateNow") == token and status.get("step") == "Done":
                    return time.monotonic() - start
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rotation {token} did not finish; operator log: {log}")
                time.sleep(0.02)

        def manual_run() -> float:
            start = time.monotonic()
            password = secrets.token_urlsafe(24)
            with pg.connect(
                host=server.host, port=server.port, database="postgres", user=server.superuser, password=server.password
            ) as admin:
                pg.set_password(admin, manual_role, password)
            assert pg.login_works(
                host=server.host, port=server.port, database="postgres", user=manual_role, password=password
            )
            encoded = base64.b64encode(password.encode()).decode()
            core.patch_namespaced_secret(
                "manual", namespace, {"data": {"password": encoded}}, _content_type="application/merge-patch+json"
            )
            return time.monotonic() - start

        try:
            operator_run("warm-up")
            operator_times, manual_times = [], []
            for index in range(args.runs):
                manual_times.append(manual_run())
                operator_times.append(operator_run(str(index)))
        finally:
            operator.terminate()
            operator.wait(30)
            core.delete_namespace(namespace)
            custom.delete_cluster_custom_object(GROUP, VERSION, "runbookgrants", namespace)

    print(f"SecretRotation latency, {args.runs} runs (PostgreSQL, single strategy, no restart targets)")
    print(f"{'':34}{'p50':>10}{'p95':>10}{'max':>10}{'mean':>10}")
    rows = (("operator (rotateNow -> Done)", operator_times), ("baseline (manual, one client)", manual_times))
    for label, values in rows:
        cells = [statistics.median(values), percentile(values, 0.95), max(values), statistics.mean(values)]
        print(f"{label:34}" + "".join(f"{v * 1000:>8.0f}ms" for v in cells))
    print(f"ratio operator/baseline: p50 {statistics.median(operator_times) / statistics.median(manual_times):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
