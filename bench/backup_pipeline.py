"""The backup agent's streaming pipeline against the runbook's sequence, on the same database in the same run.

For dumps of about 100 MB and 1 GB (``pg_dump -Fc`` output; rows generated server-side), measures:
- the agent (``runbook-operator backup``: pg_dump -Fc -> gpg -> S3 multipart, manifest last), run as its own
  process exactly as its CronJob pod runs it;
- the runbook's sequence: ``pg_dump -Fc -f FILE``, ``gpg --symmetric --cipher-algo AES256 FILE``,
  ``aws s3 cp FILE.gpg s3://...``, one after the other.
Both encrypt symmetrically with AES256 (the runbook's way) and upload to the same S3 API server (moto).
Reported: wall time, peak memory of the process tree (the agent with its pg_dump and gpg; the largest step
of the sequence) as summed PSS, each program's largest RSS, bytes the process tree wrote to local disk
(``write_bytes`` of /proc/PID/io), and of those the plaintext dump bytes.

    .venv/bin/python bench/backup_pipeline.py [--sizes 100,1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.backup_support import AGENT, new_bucket  # noqa: E402
from tests.services import Postgres, S3Server  # noqa: E402

from runbook_operator.models.plans import GPG_PASSPHRASE_ENV, JOB_NAME_ENV, SPEC_ENV  # noqa: E402

PASSPHRASE = "bench-symmetric-passphrase"
# A row of random hex: pg_dump's zlib compresses it to a bit over half, like real mixed data.
ROW_BYTES = 256
COMPRESSED_RATIO = 0.56


def _pss(pid: int) -> int:
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:")), 0)


@dataclass
class TreeMonitor:
    """Samples a process and its descendants: the peak of their summed memory (PSS), each program's largest
    RSS, and their disk writes."""

    root: int
    peak_rss: int = 0
    peaks: dict[str, int] = field(default_factory=dict)  # per program: its largest RSS
    _writes: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeMonitor:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    @property
    def disk_writes(self) -> int:
        return sum(self._writes.values())

    def _tree(self, pid: int) -> list[int]:
        pids = [pid]
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                for child in (task / "children").read_text().split():
                    pids += self._tree(int(child))
        except OSError:
            pass
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self._tree(self.root):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    io = Path(f"/proc/{pid}/io").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                name = fields["Name"].strip()
                self.peaks[name] = max(self.peaks.get(name, 0), int(fields.get("VmRSS", "0 kB").split()[0]) * 1024)
                # Summed over processes, PSS counts pages they share once (a fork before exec shares all).
                total += _pss(pid)
                self._writes[pid] = next(
                    int(line.split()[1]) for line in io.splitlines() if line.startswith("write_bytes:")
                )
            self.peak_rss = max(self.peak_rss, total)
            self._stop.wait(0.02)


@dataclass
class Result:
    seconds: float = 0.0
    peak_rss: int = 0
    disk_writes: int = 0
    plaintext_on_disk: int = 0
    uploaded: int = 0
    peaks: dict[str, int] = field(default_factory=dict)


def run_measured(args: list[str], env: dict[str, str], result: Result) -> subprocess.CompletedProcess[bytes]:
    start = time.monotonic()
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with TreeMonitor(process.pid) as monitor:
        stdout, stderr = process.communicate()
    result.seconds += time.monotonic() - start
    result.peak_rss = max(result.peak_rss, monitor.peak_rss)
    result.disk_writes += monitor.disk_writes
    for name, rss in monitor.peaks.items():
        result.peaks[name] = max(result.peaks.get(name, 0), rss)
    if process.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {stderr.decode(errors='replace')[-500:]}")
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def make_database(server: Postgres, name: str, dump_mb: int) -> None:
    rows = int(dump_mb * 1024 * 1024 / COMPRESSED_RATIO / ROW_BYTES)
    with server.connect() as conn:
        conn.execute(f"CREATE DATABASE {name}")
    with server.connect(name) as conn:
        conn.execute("CREATE TABLE payloads (id bigint PRIMARY KEY, body text NOT NULL)")
        conn.execute(
            "INSERT INTO payloads SELECT g, "
            + " || ".join(["md5(random()::text)"] * (ROW_BYTES // 32))
            + " FROM generate_series(1, %s) g",
            (rows,),
        )
        conn.execute("VACUUM ANALYZE payloads")


def bench_agent(server: Postgres, s3: S3Server, bucket: str, database: str) -> Result:
    spec = {
        "source": {
            "postgresql": {
                "host": server.host,
                "port": server.port,
                "database": database,
                "credentialsSecretRef": {"name": "db"},
                "insecurePlaintext": True,
            }
        },
        "schedule": "0 */6 * * *",
        "destination": {
            "s3": {
                "bucket": bucket,
                "prefix": "agent",
                "endpoint": s3.endpoint,
                "credentialsSecretRef": {"name": "s3"},
                "serverSideEncryption": "None",
            }
        },
        "encryption": {"gpg": {"passphraseSecretRef": {"name": "gpg", "key": "passphrase"}}},
    }
    env = {
        "PATH": os.environ["PATH"],
        "HOME": tempfile.gettempdir(),
        SPEC_ENV: json.dumps(spec),
        JOB_NAME_ENV: "bench",
        "PGUSER": server.superuser,
        "PGPASSWORD": server.password,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        GPG_PASSPHRASE_ENV: PASSPHRASE,
    }
    result = Result()
    done = run_measured([*AGENT, "--namespace", "bench", "--policy", database], env, result)
    result.uploaded = json.loads(done.stdout.decode().strip().splitlines()[-1])["sizeBytes"]
    return result


def bench_runbook(server: Postgres, s3: S3Server, bucket: str, database: str) -> Result:
    result = Result()
    with tempfile.TemporaryDirectory(prefix="runbook-bench-") as work:
        dump, encrypted = Path(work) / "backup.dump", Path(work) / "backup.dump.gpg"
        env = {**os.environ, "PGPASSWORD": server.password}
        pg = ["-h", server.host, "-p", str(server.port), "-U", server.superuser]
        run_measured(["pg_dump", "-Fc", *pg, "-f", str(dump), database], env, result)
        result.plaintext_on_disk = dump.stat().st_size
        gnupg_home = Path(work) / "gnupg"
        gnupg_home.mkdir(mode=0o700)
        gpg = ["gpg", "--homedir", str(gnupg_home), "--batch", "--pinentry-mode", "loopback"]
        gpg += ["--passphrase", PASSPHRASE, "--symmetric", "--cipher-algo", "AES256", "-o", str(encrypted), str(dump)]
        run_measured(gpg, env, result)
        aws_env = {**env, "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
        aws_env["AWS_DEFAULT_REGION"] = "us-east-1"
        target = f"s3://{bucket}/runbook/{database}/backup.dump.gpg"
        run_measured(
            ["aws", "--endpoint-url", s3.endpoint, "s3", "cp", "--quiet", str(encrypted), target], aws_env, result
        )
        result.uploaded = encrypted.stat().st_size
    return result


def mib(value: int) -> str:
    return f"{value / 2**20:8.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="Dump sizes to aim at, MB (comma-separated).")
    args = parser.parse_args()
    print(
        f"{'dump':>8} {'pipeline':<22} {'wall s':>8} {'peak MiB':>13} {'disk MiB':>9} {'plaintext MiB':>14}",
        "  largest RSS per program, MiB",
    )
    with Postgres() as server, S3Server() as s3:
        bucket = new_bucket(s3)
        for size in (int(s) for s in args.sizes.split(",")):
            database = f"bench_{size}mb"
            make_database(server, database, size)
            # Interleaved in one run, the agent first and again last, so caches favour neither.
            agent = bench_agent(server, s3, bucket, database)
            runbook = bench_runbook(server, s3, bucket, database)
            again = bench_agent(server, s3, bucket, database)
            for name, r in (("agent (streaming)", agent), ("runbook (files)", runbook), ("agent (again)", again)):
                print(
                    f"{mib(r.uploaded)} {name:<22} {r.seconds:8.1f} {mib(r.peak_rss):>13} "
                    f"{mib(r.disk_writes):>9} {mib(r.plaintext_on_disk):>14}   "
                    + ", ".join(f"{name} {rss / 2**20:.0f}" for name, rss in sorted(r.peaks.items())),
                    flush=True,
                )
            with server.connect() as conn:
                conn.execute(f"DROP DATABASE {database}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
