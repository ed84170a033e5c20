"""WAL archiving's recovery point: how long after a commit it is recoverable from the bucket, under pgbench load.

A real PostgreSQL 15 (tests/services.Postgres), the S3 API server and the receiver (``runbook-operator
wal-receive``, as its pod runs it, gpg symmetric) with the API's default ``shipIntervalSeconds`` unless
``--ship-interval`` says otherwise. The receiver first ships the WAL ``pgbench -i`` wrote (its time is reported,
not counted: a steady state is measured). Then, while ``pgbench`` writes (TPC-B-like, ``--clients``
connections) for ``--seconds``, a probe commits a row every ``--probe-interval`` seconds
(``synchronous_commit=on`` in its session; the test server's default is off) and notes the server's WAL
insert position right after the commit (the commit record ends before it). A poller reads the bucket's WAL
catalog (``reconcilers/wal_catalog.read_catalog``: signed manifests only) every ``--poll`` seconds; a probe
is recoverable once the newest shipped ``endLsn`` reaches its position.
Reported: commit-to-recoverable p50 / p95 / max, the server's commit rate (pg_stat_database) and pgbench's
own, the receiver's peak RSS (its Python process, VmHWM: the segment being received and the one being shipped),
gpg's, and the two together at one moment (what the container's memory limit must hold), and the machine's
load average before and after (``os.getloadavg``: on a shared machine the figures depend on it).

    .venv/bin/python bench/wal_rpo.py [--seconds 60] [--clients 2] [--ship-interval N] [--trace probes.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.backup_support import new_bucket  # noqa: E402
from tests.services import Postgres, S3Server  # noqa: E402
from tests.wal_support import (  # noqa: E402
    NAMESPACE,
    POLICY,
    create_slot,
    read,
    replication_role,
    start_receiver,
    stop_receiver,
    wal_env,
    wal_location,
    wal_policy_spec,
)

from runbook_operator.models.backup import WALArchiving  # noqa: E402
from runbook_operator.models.plans import parse_lsn, slot_name  # noqa: E402


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def gpg_children(pid: int) -> list[int]:
    """The gpg processes the receiver runs (children of any of its threads: the shipping thread starts them).
    A child not yet past exec shares the receiver's pages and is not counted."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            for child in (task / "children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "gpg":
                    found.append(int(child))
        except OSError:
            continue
    return found


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--ship-interval", type=int, default=WALArchiving.model_fields["ship_interval_seconds"].default)
    parser.add_argument("--probe-interval", type=float, default=0.5)
    parser.add_argument("--poll", type=float, default=0.25)
    parser.add_argument("--trace", type=Path, help="write each probe (commit and recoverable times) as JSON lines")
    args = parser.parse_args()
    load_before = os.getloadavg()

    with Postgres() as server, S3Server() as s3:
        replication_role(server)
        create_slot(server, slot_name(NAMESPACE, POLICY))
        bucket = new_bucket(s3)
        location = wal_location(s3, bucket)
        spec = wal_policy_spec(server, s3, bucket, shipIntervalSeconds=args.ship_interval)
        scratch = Path(tempfile.mkdtemp(prefix="runbook-wal-bench-"))
        log = scratch.parent / f"{scratch.name}.log"
        pgbench_env = {"PGPASSWORD": server.password, "PATH": "/usr/bin:/bin"}
        target = ["-h", server.host, "-p", str(server.port), "-U", server.superuser]
        subprocess.run(
            [str(server.bin / "pgbench"), "-i", "-s", "5", "-q", *target, "postgres"],
            env=pgbench_env,
            check=True,
            capture_output=True,
        )
        with server.connect() as conn:
            conn.execute("CREATE TABLE probe (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
        with server.connect() as conn:
            backlog = parse_lsn(str(conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]))  # type: ignore[index]
        receiver = start_receiver(wal_env(spec, s3, scratch), log)
        began = time.monotonic()
        while (newest := read(s3, location).latest()) is None or newest[0] < backlog:
            if receiver.poll() is not None or time.monotonic() - began > 600:
                raise SystemExit(f"the receiver did not ship the initial WAL (exit {receiver.poll()}); see {log}")
            time.sleep(args.poll)
        caught_up = time.monotonic() - began

        probes: list[tuple[float, int]] = []  # (commit time, WAL position after it)
        recovered: dict[int, float] = {}
        done = threading.Event()
        peak = {"receiver": 0, "gpg": 0, "together": 0}

        def probe() -> None:
            with server.connect() as conn:
                conn.execute("SET synchronous_commit = on")  # the probe's commits are flushed when they return
                while not done.is_set():
                    conn.execute("INSERT INTO probe DEFAULT VALUES")  # autocommit: committed on return
                    at = time.monotonic()
                    row = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()  # >= the commit's end
                    assert row is not None
                    probes.append((at, parse_lsn(str(row[0]))))
                    time.sleep(args.probe_interval)

        def poll() -> None:
            while not done.is_set() or len(recovered) < len(probes):
                newest = read(s3, location).latest()
                now = time.monotonic()
                if newest is not None:
                    for index, (_, lsn) in enumerate(list(probes)):
                        if index not in recovered and lsn <= newest[0]:
                            recovered[index] = now
                if done.is_set() and now - probes[-1][0] > 60:
                    break
                time.sleep(args.poll)

        def memory() -> None:
            while not done.is_set():
                peak["receiver"] = max(peak["receiver"], status_kib(receiver.pid, "VmHWM"))
                gpg = [status_kib(child, "VmRSS") for child in gpg_children(receiver.pid)]  # one per ship
                peak["gpg"] = max([peak["gpg"], *gpg])
                peak["together"] = max(peak["together"], status_kib(receiver.pid, "VmRSS") + sum(gpg))
                time.sleep(0.1)

        with server.connect() as conn:
            commits = "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'"
            before = conn.execute(commits).fetchone()[0]  # type: ignore[index]
            wal_before = float(conn.execute("SELECT wal_bytes FROM pg_stat_wal").fetchone()[0])  # type: ignore[index]
        threads = [threading.Thread(target=f) for f in (probe, poll, memory)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        bench = subprocess.run(
            [str(server.bin / "pgbench"), "-c", str(args.clients), "-T", str(args.seconds), "-n", *target, "postgres"],
            env=pgbench_env,
            capture_output=True,
            text=True,
            check=True,
        )
        elapsed = time.monotonic() - started
        done.set()
        with server.connect() as conn:
            conn.execute("SELECT pg_stat_force_next_flush()")
            after = conn.execute(commits).fetchone()[0]  # type: ignore[index]
            wal_after = float(conn.execute("SELECT wal_bytes FROM pg_stat_wal").fetchone()[0])  # type: ignore[index]
            wal_bytes = wal_after - wal_before
        for thread in threads:
            thread.join(120)
        code = stop_receiver(receiver)
        catalog = read(s3, location)

    load_after = os.getloadavg()
    if args.trace is not None:
        with args.trace.open("w") as out:
            for index, (at, lsn) in enumerate(probes):
                out.write(json.dumps({"commit": at, "lsn": lsn, "recoverable": recovered.get(index)}) + "\n")
    tps = next((line for line in bench.stdout.splitlines() if line.startswith("tps")), "tps = ?")
    delays = [recovered[i] - probes[i][0] for i in recovered]
    lost = len(probes) - len(recovered)
    rows = [
        ("load", f"pgbench -c {args.clients} -T {args.seconds} (scale 5), shipIntervalSeconds={args.ship_interval}"),
        (
            "machine load average",
            f"{' '.join(f'{v:.2f}' for v in load_before)} before, "
            f"{' '.join(f'{v:.2f}' for v in load_after)} after ({os.cpu_count()} CPUs)",
        ),
        ("initial WAL shipped in", f"{caught_up:.1f} s ({backlog / 1024 / 1024:.0f} MiB from pgbench -i; not counted)"),
        ("server commit rate", f"{(after - before) / elapsed:.0f} commits/s (pg_stat_database)"),
        ("pgbench", tps.split("(")[0].strip()),
        ("WAL written", f"{wal_bytes / 1024 / 1024 / elapsed:.2f} MiB/s"),
        ("probes", f"{len(probes)} ({lost} never recoverable)"),
        ("commit -> recoverable p50", f"{statistics.median(delays):.2f} s"),
        ("commit -> recoverable p95", f"{percentile(delays, 0.95):.2f} s"),
        ("commit -> recoverable max", f"{max(delays):.2f} s"),
        ("receiver peak RSS (python, VmHWM)", f"{peak['receiver'] / 1024:.1f} MiB"),
        ("gpg peak RSS", f"{peak['gpg'] / 1024:.1f} MiB"),
        ("receiver + gpg peak RSS (at one time)", f"{peak['together'] / 1024:.1f} MiB"),
        ("segments in the bucket", f"{len(catalog.segments)}; gaps {len(catalog.gaps())}; receiver exit {code}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if lost == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
