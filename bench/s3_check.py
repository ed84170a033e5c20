"""What a BackupPolicy pass costs on the S3 side: the operator's shared client and cached bucket check against,
as the same-run baseline, what a pass did before (a new boto3 client, HEAD bucket and the lifecycle GET every
time). Both against the same moto S3 API server (its own process, so only the operator's side is counted):
CPU seconds of this process (``time.process_time``), wall time and S3 requests per pass.

    .venv/bin/python bench/s3_check.py [--passes 300] [--policies 50]

``--policies``: distinct prefixes (as many policies sharing one bucket and one Secret's keys), passed in turn.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.services import S3Server

from runbook_operator.clients import s3
from runbook_operator.models.sources import S3Location
from runbook_operator.reconcilers import catalog


class Counted:
    """Counts the S3 requests a client sends (botocore's before-send event)."""

    def __init__(self) -> None:
        self.requests = 0

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-send.s3", self._count)
        return client

    def _count(self, **_: Any) -> None:
        self.requests += 1


def run(name: str, passes: int, one_pass: Callable[[int], None], counted: Counted) -> dict[str, float]:
    counted.requests = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for n in range(passes):
        one_pass(n)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    figures = {"cpu_us": 1e6 * cpu / passes, "wall_us": 1e6 * wall / passes, "requests": counted.requests / passes}
    cpu_us, wall_us, requests = figures["cpu_us"], figures["wall_us"], figures["requests"]
    print(f"{name:<46} {cpu_us:9.0f} us CPU {wall_us:9.0f} us wall {requests:5.2f} requests")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=300)
    parser.add_argument("--policies", type=int, default=50)
    args = parser.parse_args()
    with S3Server() as server:
        bucket = "bench-bucket"
        server.client().create_bucket(Bucket=bucket)
        locations = [
            S3Location(bucket=bucket, prefix=f"tenant-{n}", endpoint=server.endpoint, server_side_encryption="None")
            for n in range(args.policies)
        ]
        keys = (server.access_key, server.secret_key)
        counted = Counted()

        def before(n: int) -> None:  # the baseline: every pass made its own client and checked the bucket
            location = locations[n % len(locations)]
            client = counted.attach(s3.make_client(location, *keys, timeouts=s3.OPERATOR_TIMEOUTS))
            client.head_bucket(Bucket=bucket)
            s3.ensure_abort_incomplete_uploads(client, location)

        def now(n: int) -> None:  # the operator's pass today
            location = locations[n % len(locations)]
            catalog.check_bucket(s3.shared_client(location, *keys), location)

        counted.attach(s3.shared_client(locations[0], *keys))  # one client for every location: counted once
        for location in locations:  # the rules in place for both (the steady state: a resync)
            catalog.check_bucket(s3.shared_client(location, *keys), location)
        print(f"{args.passes} passes over {args.policies} policies sharing one bucket (moto S3 API server)")
        baseline = run("before: new client + HEAD + lifecycle GET", args.passes, before, counted)
        cached = run("now: shared client, check cached (600 s TTL)", args.passes, now, counted)
        catalog.CHECK_TTL = 0.0
        for location in locations:
            catalog.forget_bucket(location)
        checked = run("now, TTL 0: shared client, checked every pass", args.passes, now, counted)
        print(
            f"CPU per pass vs before: cached {cached['cpu_us'] / baseline['cpu_us']:.2%}, "
            f"checked every pass {checked['cpu_us'] / baseline['cpu_us']:.0%}"
        )


if __name__ == "__main__":
    main()
