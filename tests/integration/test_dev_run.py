"""The README's quick start, exactly: `make run`'s script (tools/dev/run.sh) without $KUBECONFIG, in the
background (the local cluster with its real node, the platform, the operator as a pod), then in another shell
`kubectl apply -f deploy/samples/`: every object Ready=True and, within 3 minutes of the apply, the PostgreSQL
backup in the local bucket, which the README's by-hand commands list, decrypt and restore."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import ROOT

import localcluster

pytestmark = pytest.mark.integration
NAMESPACE = "hungryhippaahneties"
READY = "run: platform and operator ready"
BUSY = "(one per machine)"  # localcluster's refusal while another state dir has the real node
BACKUP_WITHIN = 180.0

# The README's commands after `make run`, in order (KUBECONFIG is set by the test as the README's export does).
APPLY = "kubectl apply -f deploy/samples/"
WAIT_READY = (
    "kubectl wait -n hungryhippaahneties --for=condition=Ready=True --timeout=120s"
    " backuppolicies,secretrotations,scalingprofiles --all"
)
# A Secret's key, decoded (the by-hand commands' helper).
SECRET = """secret() { kubectl get secret -n hungryhippaahneties "$1" -o jsonpath="{.data.$2}" | base64 -d; }
"""
LIST = (
    SECRET
    + """
kubectl port-forward -n storage svc/s3 5000:5000 >/dev/null & forward=$!; trap 'kill $forward' EXIT
sleep 2
export AWS_ACCESS_KEY_ID=$(secret backup-s3-credentials AWS_ACCESS_KEY_ID)
export AWS_SECRET_ACCESS_KEY=$(secret backup-s3-credentials AWS_SECRET_ACCESS_KEY)
aws --endpoint-url http://127.0.0.1:5000 --region us-east-1 s3 ls --recursive s3://hungryhippaahneties-backups/
"""
)
RESTORE = (
    SECRET
    + """
kubectl port-forward -n storage svc/s3 5000:5000 >/dev/null & s3=$!
kubectl port-forward -n hungryhippaahneties svc/postgresql 15432:5432 >/dev/null & pg=$!
export GNUPGHOME=$(mktemp -d)
trap 'kill $s3 $pg; rm -rf "$GNUPGHOME"' EXIT
sleep 2
export AWS_ACCESS_KEY_ID=$(secret backup-s3-credentials AWS_ACCESS_KEY_ID)
export AWS_SECRET_ACCESS_KEY=$(secret backup-s3-credentials AWS_SECRET_ACCESS_KEY)
secret restore-gpg-private-key 'security-team-private\\.asc' | gpg --batch --quiet --import
folder=$(kubectl get bp -n hungryhippaahneties postgresql -o jsonpath='{.status.lastSuccessfulBackup.key}')
dump=s3://hungryhippaahneties-backups/${folder}postgresql.dump.gpg
export PGHOST=127.0.0.1 PGPORT=15432 PGUSER=$(secret postgres-admin POSTGRES_USER)
export PGPASSWORD=$(secret postgres-admin POSTGRES_PASSWORD)
aws --endpoint-url http://127.0.0.1:5000 --region us-east-1 s3 cp "$dump" - \\
  | gpg --batch --quiet --decrypt | pg_restore --list | grep '; *dbname:'
createdb restored_by_hand
aws --endpoint-url http://127.0.0.1:5000 --region us-east-1 s3 cp "$dump" - \\
  | gpg --batch --quiet --decrypt | pg_restore --no-owner --no-privileges --exit-on-error -d restored_by_hand
"""
)
WAIT_RESTORE = "kubectl wait -n hungryhippaahneties --for=condition=Ready=True --timeout=180s backuprestores --all"


def shell(command: str, env: dict[str, str], timeout: float = 120) -> str:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def node_in_use() -> bool:
    return localcluster.node_owner() is not None or bool(
        localcluster.pids_mentioning(str(localcluster.node_bin_dir() / "kubelet"))
    )


def node_free() -> bool:
    """No run has the machine's real node now, nor 5 s later: the claim is not atomic, and two runs that both
    saw it free at once collide."""
    if node_in_use():
        return False
    time.sleep(5)
    return not node_in_use()


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """run.sh in the background until its platform and operator are ready (waiting while another test has the
    machine's real node); the kubectl environment and its log. Stopped (the cluster with it) afterwards."""
    env = {key: value for key, value in os.environ.items() if key != "KUBECONFIG"}
    env["RUNBOOK_RUN_STATE_DIR"] = str(tmp_path / "state")
    log = tmp_path / "run.log"
    deadline = time.monotonic() + 1800
    while True:
        # As tests/e2e/conftest.py: a node owner or a kubelet of ours means another run has (or is starting) the
        # machine's real node; never stop someone else's.
        while not node_free():
            assert time.monotonic() < deadline, "the machine's real node stayed in use for 30 min"
            time.sleep(10)
        started = time.monotonic()
        with log.open("wb") as out:
            run = subprocess.Popen(
                [str(ROOT / "tools/dev/run.sh")],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while READY not in log.read_text() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        if run.poll() is not None and BUSY in log.read_text() and time.monotonic() < deadline:
            continue  # another run took the node meanwhile
        break
    try:
        assert READY in log.read_text(), log.read_text()
        print(f"make run ready in {time.monotonic() - started:.0f} s")
        yield (
            env
            | {
                "KUBECONFIG": str(tmp_path / "state" / "kubeconfig"),
                # kubectl of the local cluster; aws of `make setup` (.venv/bin), as the README says
                "PATH": f"{localcluster.bin_dir()}:{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
            },
            log,
        )
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(120)


def test_make_run_then_the_samples_give_ready_objects_and_a_backup_in_the_local_bucket(
    make_run: tuple[dict[str, str], Path],
) -> None:
    env, log = make_run
    applied = time.monotonic()
    shell(APPLY, env)
    shell(WAIT_READY, env, timeout=150)
    print(f"samples Ready=True {time.monotonic() - applied:.0f} s after the apply")

    listing = ""
    while "manifest.json" not in listing and time.monotonic() - applied < BACKUP_WITHIN:
        time.sleep(10)
        listing = shell(LIST, env)
    assert "manifest.json" in listing, listing
    print(f"backup listed {time.monotonic() - applied:.0f} s after the apply:\n{listing}")
    manifests = [line for line in listing.splitlines() if line.endswith("manifest.json")]
    assert len(manifests) == 1 and "postgresql/hungryhippaahneties/postgresql/" in manifests[0], listing

    # The restore dry run needs a backup to exist: the README's next step.
    shell("kubectl apply -f deploy/samples/restore/", env)
    shell(WAIT_RESTORE, env, timeout=200)
    assert shell(RESTORE, env).split() == [";", "dbname:", "hungryhippaahneties_db"]

    ready = shell(
        "kubectl get -n hungryhippaahneties backuppolicies,secretrotations,scalingprofiles,backuprestores -o jsonpath="
        """'{range .items[*]}{.kind}/{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}'""",
        env,
    )
    assert sorted(ready.split()) == [
        "BackupPolicy/kubernetes-configs=True",
        "BackupPolicy/postgresql=True",
        "BackupPolicy/redis=True",
        "BackupRestore/restore-latest=True",
        "ScalingProfile/api=True",
        "SecretRotation/hipaa-app-user=True",
    ]
    # The operator's log (kopf's JSON lines, which run.sh follows): no error.
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert records, log.read_text()
    assert [r for r in records if r.get("severity") in ("error", "fatal")] == []
