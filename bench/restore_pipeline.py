"""The restore agent's streaming pipeline against the runbook's restore sequence, same backup, same run.

A backup of about 100 MB (``pg_dump -Fc`` output) is made by the backup agent (symmetric AES256, the
runbook's way), then restored into the same database by:
- the preflight (``runbook-operator verify``: SHA-256 while streaming, full decryption, ``pg_restore
  --list``), as the operator runs it before touching anything;
- the agent (``runbook-operator restore``: S3 -> gpg -> ``pg_restore --clean --single-transaction``),
  run as its own process exactly as its Job's pod runs it;
- the runbook's sequence: ``aws s3 cp`` download, ``sha256sum``, ``gpg --decrypt -o FILE``, ``pg_restore
  -c -d DB FILE``, one after the other.
Reported: wall time, peak RSS of the process tree, bytes it wrote to local disk, and of those the
plaintext dump bytes. The agent runs first and again last, so caches favour neither.

    .venv/bin/python bench/restore_pipeline.py [--size 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.backup_pipeline import PASSPHRASE, Result, bench_agent, make_database, mib, run_measured  # noqa: E402
from tests.backup_support import new_bucket  # noqa: E402
from tests.services import Postgres, S3Server  # noqa: E402

from runbook_operator.models.plans import GPG_PASSPHRASE_ENV, MANIFEST, RESTORE_PLAN_ENV  # noqa: E402


def latest_manifest(s3: S3Server, bucket: str, database: str) -> dict[str, object]:
    keys = [
        item["Key"]
        for item in s3.client().list_objects_v2(Bucket=bucket, Prefix=f"agent/bench/{database}/")["Contents"]
        if item["Key"].endswith(MANIFEST)
    ]
    document: dict[str, object] = json.loads(s3.client().get_object(Bucket=bucket, Key=max(keys))["Body"].read())
    return document


def bench_agent_command(command: str, server: Postgres, s3: S3Server, bucket: str, database: str) -> Result:
    manifest = latest_manifest(s3, bucket, database)
    data: dict[str, object] = manifest["data"]  # type: ignore[assignment]
    plan = {
        "location": {"bucket": bucket, "prefix": "agent", "endpoint": s3.endpoint, "serverSideEncryption": "None"},
        "key": data["key"],
        "sha256": data["sha256"],
        "sizeBytes": data["sizeBytes"],
        "symmetric": True,
        "tables": ["public.payloads"],
        "target": {
            "host": server.host,
            "port": server.port,
            "database": database,
            "credentialsSecretRef": {"name": "db"},
            "insecurePlaintext": True,
        },
    }
    env = {
        "PATH": os.environ["PATH"],
        "HOME": tempfile.gettempdir(),
        RESTORE_PLAN_ENV: json.dumps(plan),
        "PGUSER": server.superuser,
        "PGPASSWORD": server.password,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        GPG_PASSPHRASE_ENV: PASSPHRASE,
    }
    result = Result(uploaded=int(str(data["sizeBytes"])))
    run_measured([sys.executable, "-m", "runbook_operator.cli", command], env, result)
    return result


def bench_runbook(server: Postgres, s3: S3Server, bucket: str, database: str) -> Result:
    manifest = latest_manifest(s3, bucket, database)
    data: dict[str, object] = manifest["data"]  # type: ignore[assignment]
    result = Result(uploaded=int(str(data["sizeBytes"])))
    with tempfile.TemporaryDirectory(prefix="runbook-bench-") as work:
        encrypted, dump = Path(work) / "backup.dump.gpg", Path(work) / "backup.dump"
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        source = f"s3://{bucket}/{data['key']}"
        run_measured(["aws", "--endpoint-url", s3.endpoint, "s3", "cp", "--quiet", source, str(encrypted)], env, result)
        run_measured(["sha256sum", str(encrypted)], env, result)
        gnupg_home = Path(work) / "gnupg"
        gnupg_home.mkdir(mode=0o700)
        gpg = ["gpg", "--homedir", str(gnupg_home), "--batch", "--pinentry-mode", "loopback"]
        run_measured([*gpg, "--passphrase", PASSPHRASE, "-o", str(dump), "--decrypt", str(encrypted)], env, result)
        result.plaintext_on_disk = dump.stat().st_size
        pg = ["-h", server.host, "-p", str(server.port), "-U", server.superuser]
        run_measured(
            ["pg_restore", "-c", "--if-exists", *pg, "-d", database, str(dump)],
            {**env, "PGPASSWORD": server.password},
            result,
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100, help="Dump size to aim at, MB.")
    args = parser.parse_args()
    print(
        f"{'backup MiB':>10} {'pipeline':<26} {'wall s':>8} {'peak RSS MiB':>13} {'disk MiB':>9} {'plaintext MiB':>14}"
    )
    with Postgres() as server, S3Server() as s3:
        bucket = new_bucket(s3)
        database = f"bench_{args.size}mb"
        make_database(server, database, args.size)
        bench_agent(server, s3, bucket, database)
        runs = [
            ("preflight (verify)", bench_agent_command("verify", server, s3, bucket, database)),
            ("agent restore (streaming)", bench_agent_command("restore", server, s3, bucket, database)),
            ("runbook (files)", bench_runbook(server, s3, bucket, database)),
            ("agent restore (again)", bench_agent_command("restore", server, s3, bucket, database)),
        ]
        for name, r in runs:
            print(
                f"{mib(r.uploaded):>10} {name:<26} {r.seconds:8.1f} {mib(r.peak_rss):>13} "
                f"{mib(r.disk_writes):>9} {mib(r.plaintext_on_disk):>14}",
                flush=True,
            )
        expected = latest_manifest(s3, bucket, database)["source"]["tableRowCounts"]  # type: ignore[index]
        with server.connect(database) as conn:
            found = conn.execute("SELECT count(*) FROM payloads").fetchone()
        assert found is not None and found[0] == expected["public.payloads"], (found, expected)
        print(f"restored rows after the last run: {found[0]} (manifest: {expected['public.payloads']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
