"""What a restore's preflight costs the operator's pod, by backup size: before and since the verify Job.

For each size a backup (``pg_dump -Fc``, encrypted to a test key) is made by the backup agent, then measured
in the same run:
- **before** (the preflight in the operator): the whole object streamed through ``verify`` (SHA-256, gpg,
  ``pg_restore --list``), the code the operator ran in its own process and pod until issue 14, while a worker
  thread waited on it; it now runs in the verify Job's pod (the same ``runbook-operator verify``);
- **now** (the operator's share): the manifest read from S3 and the verify Job built from it
  (``build_verify_job``), the per-byte-free work a preflight pass does.
Each runs as its own process; reported: wall time, CPU seconds and peak RSS of its largest process (the
agent's Python, gpg or pg_restore), and the bytes of the bucket it read.

    .venv/bin/python bench/restore_preflight.py [--sizes 20,100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.restore_support import (  # noqa: E402
    OWNER,
    OWNER_PASSWORD,
    create_shop,
    make_backup,
    plan_for,
    private_key,
    restore_env,
)
from tests.services import GpgKeyring, Postgres, S3Server  # noqa: E402

# Runs a command and prints its process tree's largest RSS (KiB) and CPU seconds.
_MEASURE = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True); "
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(done.returncode, usage.ru_maxrss, usage.ru_utime + usage.ru_stime, done.stdout.decode().strip()[-200:])"
)
# The operator's share of a preflight: the manifest read, the verify Job built from it.
_OPERATOR_SHARE = """
import json, os
from runbook_operator.builders.restore import build_verify_job
from runbook_operator.clients.s3 import get_json, make_client
from runbook_operator.models.backup import BackupPolicySpec, BackupRestoreSpec
from runbook_operator.models.plans import RestorePlan
plan = RestorePlan.model_validate(json.loads(os.environ["RUNBOOK_RESTORE_PLAN"]))
client = make_client(plan.location, os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
manifest = get_json(client, plan.location, plan.key.rsplit("/", 1)[0] + "/manifest.json")
policy = BackupPolicySpec.model_validate(json.loads(os.environ["BENCH_POLICY"]))
body = {"apiVersion": "runbook.dev/v1alpha1", "kind": "BackupRestore",
        "metadata": {"name": "r", "namespace": "bench", "uid": "u"}}
spec = BackupRestoreSpec.model_validate({"policyRef": "db", "decryptionSecretRef": {"name": "k", "key": "k"}})
build_verify_job(body, plan, source="postgresql", policy=policy, spec=spec, image="agent")
print(len(json.dumps(manifest)))
"""


def make_database(postgres: Postgres, megabytes: int) -> str:
    """The tests' shop database plus a table whose dump is about ``megabytes`` MB (random hex, about 2:1)."""
    name = create_shop(postgres)
    with postgres.connect(name, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute("CREATE TABLE payloads (id bigint PRIMARY KEY, body text NOT NULL)")
        rows = megabytes * 1024 * 1024 * 2 // 256
        body = " || ".join(["md5(random()::text)"] * 8)
        conn.execute(f"INSERT INTO payloads SELECT g, {body} FROM generate_series(1, %s) g", (rows,))
    return name


def measured(args: list[str], env: dict[str, str]) -> tuple[float, int, float, str]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _MEASURE, *args], env=env, capture_output=True, text=True, check=True)
    code, rss_kib, cpu, output = done.stdout.split(" ", 3)
    if code != "0":
        raise RuntimeError(f"{args}: exit {code}: {output}")
    return time.monotonic() - started, int(rss_kib) * 1024, float(cpu), output.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20,100", help="Dump sizes to aim at, MB, comma-separated.")
    args = parser.parse_args()
    header = (
        f"{'backup MiB':>10} {'preflight work in the operator':<34} {'wall s':>7} {'CPU s':>6} {'peak RSS MiB':>12}"
    )
    print(f"{header} {'bucket bytes read':>17}", flush=True)
    with tempfile.TemporaryDirectory() as home, Postgres() as postgres, S3Server() as s3:
        keyring = GpgKeyring(Path(home) / "gpg").start()
        for size in (int(s) for s in args.sizes.split(",")):
            database = make_database(postgres, size)
            backup = make_backup(postgres, database, s3, keyring)
            plan = plan_for(backup, backup.spec["source"]["postgresql"])
            env = restore_env(plan, s3, private_key(keyring), BENCH_POLICY=json.dumps(backup.spec))
            size_bytes = backup.manifest["data"]["sizeBytes"]
            before = measured([sys.executable, "-m", "runbook_operator.cli", "verify"], env)
            now = measured([sys.executable, "-c", _OPERATOR_SHARE], env)
            for name, (wall, rss, cpu, _), read in (
                ("before: verify (whole object)", before, size_bytes),
                ("now: manifest + verify Job built", now, int(now[3])),
            ):
                print(f"{size_bytes / 2**20:10.1f} {name:<34} {wall:7.2f} {cpu:6.2f} {rss / 2**20:12.1f} {read:17}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
