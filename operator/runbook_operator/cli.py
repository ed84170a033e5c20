"""``runbook-operator``: run the operator, generate CRDs, and (inside Job pods) the agent commands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .logs import install_redactor

if TYPE_CHECKING:
    from .settings import Settings

_CRDS_DEFAULT = Path("crds")


def _run(args: argparse.Namespace) -> int:
    import kopf

    from . import main as handlers  # importing it registers the handlers; it holds the settings too
    from . import metrics

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    install_redactor()  # again: kopf.configure replaced the root's handler and set the root to DEBUG
    namespaces, health_port = run_scope(args, handlers.SETTINGS)
    handlers.SCOPE = namespaces  # the containment watch's scope: kopf's
    elector = None
    if handlers.SETTINGS.leader_election:  # a hot standby until it holds the Lease: kopf not even started
        from .clients.kube import KubeApi
        from .leader import Elector

        elector = Elector.from_settings(KubeApi(), handlers.SETTINGS)
        metrics.serve(handlers.SETTINGS.metrics_port)  # a standby is scraped too: runbook_leader 0
        elector.acquire(health_port=health_port)
        elector.hold()  # from now on the process ends itself as soon as it cannot renew in time
    metrics.LEADER.set(1)
    try:
        kopf.run(
            standalone=True,  # no kopf peering: the Lease decides who acts (leader.py says why)
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
        )
    finally:
        if elector is not None:
            from .reconcilers.runtime import CONTAINMENT, EXECUTOR

            for pool in (EXECUTOR, CONTAINMENT):  # no blocking call may still act once the Lease is given up
                pool.shutdown(cancel_futures=True)
            elector.release()
    return 0


def run_scope(args: argparse.Namespace, settings: Settings) -> tuple[list[str], int]:
    """The namespaces to watch (all when empty) and the health port: the flags, else RUNBOOK_NAMESPACES and
    RUNBOOK_HEALTH_PORT."""
    namespaces = list(args.namespace or settings.namespaces)
    return namespaces, settings.health_port if args.health_port is None else args.health_port


def _crds(args: argparse.Namespace) -> int:
    from .crdgen import write_crds

    for path in write_crds(args.output):
        print(path)
    return 0


def _backup(args: argparse.Namespace) -> int:
    from .agent.backup import main as backup

    return backup(namespace=args.namespace, policy=args.policy, generation=args.generation)


def _restore(args: argparse.Namespace) -> int:
    from .agent.restore import main as restore

    return restore(args.command, source=args.source)


def _restore_kubernetes(args: argparse.Namespace) -> int:
    from .agent.restore_kubernetes import main as restore_kubernetes

    return restore_kubernetes()


def _restore_redis(args: argparse.Namespace) -> int:
    from .agent.restore_redis import main as restore_redis

    return restore_redis()


def _restore_pitr(args: argparse.Namespace) -> int:
    from .agent.pitr import main as restore_pitr

    return restore_pitr()


def _wal_receive(args: argparse.Namespace) -> int:
    from .agent.wal import receive_main

    return receive_main(namespace=args.namespace, policy=args.policy)


def _base_backup(args: argparse.Namespace) -> int:
    from .agent.wal import base_backup_main

    return base_backup_main(namespace=args.namespace, policy=args.policy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runbook-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="Run the operator against the current kubeconfig or in-cluster.")
    run.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="Watch only this namespace (repeatable); RUNBOOK_NAMESPACES (comma-separated) when absent, else all.",
    )
    run.add_argument(
        "--verbose",
        action="store_true",
        help="Debug logging of the operator and kopf (HTTP libraries stay at INFO: they would print bodies).",
    )
    run.add_argument("--log-format", choices=["json", "full", "plain"], default="json", help="Log line format.")
    run.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="Liveness endpoint port (0: none; default RUNBOOK_HEALTH_PORT, 8080).",
    )
    run.set_defaults(func=_run)

    crds = commands.add_parser("crds", help="Write the CRDs generated from the models.")
    crds.add_argument("--output", type=Path, default=_CRDS_DEFAULT, help="Directory (default: crds/).")
    crds.set_defaults(func=_crds)

    backup = commands.add_parser(
        "backup", help="(In a CronJob pod) one backup run; the spec and credentials come from the environment."
    )
    backup.add_argument("--namespace", required=True, help="Namespace of the BackupPolicy.")
    backup.add_argument("--policy", required=True, help="Name of the BackupPolicy.")
    backup.add_argument("--generation", type=int, default=None, help="The policy generation the pod was built from.")
    backup.set_defaults(func=_backup)

    for command, purpose in (
        ("restore", "(In a BackupRestore's Job pod) stream a backup S3 -> gpg -> pg_restore into the target."),
        ("verify", "(In a BackupRestore's preflight Job) read a backup, writing nothing: digest, decryption, content."),
    ):
        agent = commands.add_parser(command, help=f"{purpose} The plan and credentials come from the environment.")
        agent.add_argument("--namespace", help="Namespace of the BackupRestore (for the logs).")
        agent.add_argument("--name", help="Name of the BackupRestore (for the logs).")
        agent.set_defaults(func=_restore, source="postgresql")
    agent.add_argument(  # verify's: the preflight's Job reads a backup of any source kind
        "--source", choices=("postgresql", "redis", "kubernetes"), default="postgresql", help="The backup's kind."
    )
    agent = commands.add_parser(
        "restore-kubernetes",
        help="(In a BackupRestore's Job pod) apply one namespace section of a Kubernetes export (server-side "
        "apply, or the API server's dry run). The plan and credentials come from the environment.",
    )
    agent.add_argument("--namespace", help="Namespace of the BackupRestore (for the logs).")
    agent.add_argument("--name", help="Name of the BackupRestore (for the logs).")
    agent.set_defaults(func=_restore_kubernetes)
    agent = commands.add_parser(
        "restore-redis",
        help="(In a BackupRestore's Job pod) load a Redis backup's RDB into a scratch server in memory, then copy "
        "every key into the target (FLUSHALL first). The plan and credentials come from the environment.",
    )
    agent.add_argument("--namespace", help="Namespace of the BackupRestore (for the logs).")
    agent.add_argument("--name", help="Name of the BackupRestore (for the logs).")
    agent.set_defaults(func=_restore_redis)
    agent = commands.add_parser(
        "restore-pitr",
        help="(In a point-in-time BackupRestore's Job pod) fetch and verify a base backup and its WAL, stage them "
        "beside the data directory on the mounted volume, then swap them in, set to recover to the target. The "
        "plan and credentials come from the environment.",
    )
    agent.add_argument("--namespace", help="Namespace of the BackupRestore (for the logs).")
    agent.add_argument("--name", help="Name of the BackupRestore (for the logs).")
    agent.set_defaults(func=_restore_pitr)
    for command, purpose, func in (
        (
            "wal-receive",
            "(In a BackupPolicy's <policy>-wal Deployment) stream WAL through the policy's replication slot and "
            "ship every segment, encrypted, to the bucket, until SIGTERM.",
            _wal_receive,
        ),
        (
            "base-backup",
            "(In a BackupPolicy's <policy>-base CronJob pod) one base backup, pg_basebackup -> gpg -> S3.",
            _base_backup,
        ),
    ):
        agent = commands.add_parser(command, help=f"{purpose} The spec and credentials come from the environment.")
        agent.add_argument("--namespace", required=True, help="Namespace of the BackupPolicy.")
        agent.add_argument("--policy", required=True, help="Name of the BackupPolicy.")
        agent.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    install_redactor()  # before anything can log: every command's records are scrubbed as they are made
    args = build_parser().parse_args(argv)
    if args.command != "run":  # kopf configures logging for the operator itself
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
