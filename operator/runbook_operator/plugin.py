"""``kubectl runbook``: the runbook's incident commands as a kubectl plugin (the ``kubectl-runbook`` executable).

A client of the API like kubectl itself: it reads and writes runbook.dev objects with the user's own kube
credentials (``--kubeconfig``, ``--context``, ``-n``; the namespace defaults to the context's) and lets the
operator act; it never imports the operator's handlers. ``backup list`` (and ``restore --backup KEY``'s
check) read the bucket with the keys in the Secret the policy names, so they need ``get`` on that Secret;
no secret value is ever printed. Human output by default, ``-o json`` or ``-o yaml`` for scripts; progress
of ``--wait`` goes to stderr, so stdout stays parseable.

Exit codes: 0 done; 1 the API server or the bucket could not be reached or refused (e.g. Forbidden);
2 usage or bad input (argparse's own code); 3 not found (a policy, rotation, isolation or backup);
4 the operation failed, or timed out while waiting; 5 refused by the cluster's state (the namespace is
already isolated, the name is taken).
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.exceptions
import kubernetes
import urllib3
import yaml
from kubernetes.client import ApiException
from pydantic import BaseModel, ValidationError

from .clients import kube, s3
from .errors import describe_validation_error
from .models import GROUP, VERSION
from .models.backup import BACKUP_NOW, BackupPolicySpec, BackupRestoreSpec
from .models.common import parse_duration
from .models.isolation import EmergencyIsolationSpec, holding_isolation
from .models.plans import MANIFEST, backup_folder, format_timestamp, policy_folder
from .reconcilers.catalog import stored_backups

OK, API_ERROR, USAGE, NOT_FOUND, FAILED, CONFLICT = 0, 1, 2, 3, 4, 5
API_VERSION = f"{GROUP}/{VERSION}"
POLICIES, RESTORES, ROTATIONS, ISOLATIONS, PROFILES = (
    "backuppolicies",
    "backuprestores",
    "secretrotations",
    "emergencyisolations",
    "scalingprofiles",
)
KIND_OF = {
    POLICIES: "BackupPolicy",
    RESTORES: "BackupRestore",
    ROTATIONS: "SecretRotation",
    ISOLATIONS: "EmergencyIsolation",
    PROFILES: "ScalingProfile",
}
RESOURCES = {plural: kube.custom_resource(plural, kind) for plural, kind in KIND_OF.items()}
FIELD_MANAGER = "kubectl-runbook"
# Phases the operator writes (reconcilers/restore.py, isolation.py, rotation.py): what a wait ends on.
RESTORE_DONE = {"Succeeded": OK, "DryRunSucceeded": OK, "Failed": FAILED}
ISOLATION_DONE = {"Isolated": OK, "Rejected": CONFLICT, "Invalid": FAILED}
# Conditions worth a line on the status screen besides Ready: those True when something is wrong, and those
# False when something is wrong.
BAD_WHEN_TRUE = {"Degraded", "Conflict", "Paused", "ExistingPoliciesAllow"}
BAD_WHEN_FALSE = {"LastBackupSucceeded", "Verified", "EvidencePreserved", "Restored"}
POLL_SECONDS = 1.0


class PluginError(Exception):
    """What the user sees on stderr, and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- the cluster ----------------------------------------------------------------------------------------


@dataclass
class Cluster:
    """The user's API access in one namespace."""

    api: kube.KubeApi
    namespace: str

    @classmethod
    def connect(cls, *, kubeconfig: str | None, context: str | None, namespace: str | None) -> Cluster:
        """As kubectl: the kubeconfig (``--kubeconfig``, ``$KUBECONFIG``, ``~/.kube/config``) and its context's
        namespace, or in a pod its ServiceAccount."""
        try:
            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=configuration
            )
            _, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
            if context:
                contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
                active = next(c for c in contexts if c["name"] == context)
            default_namespace = (active.get("context") or {}).get("namespace") or "default"
        except (kubernetes.config.ConfigException, FileNotFoundError, StopIteration) as error:
            account = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            if kubeconfig or context or not account.is_file():
                raise PluginError(f"no usable kubeconfig: {error}", API_ERROR) from None
            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            default_namespace = account.read_text().strip()
        configuration.retries = 1  # an unreachable server fails in seconds, not after urllib3's backoff
        api = kube.KubeApi(kubernetes.client.ApiClient(configuration), field_manager=FIELD_MANAGER)
        return cls(api, namespace or default_namespace)

    def _not_found(self, plural: str, name: str) -> PluginError:
        return PluginError(f"{KIND_OF[plural]} {name!r} not found in namespace {self.namespace}", NOT_FOUND)

    def get(self, plural: str, name: str) -> dict[str, Any]:
        found = self.api.get(RESOURCES[plural], self.namespace, name)
        if found is None:
            raise self._not_found(plural, name)
        return found

    def list(self, plural: str) -> list[dict[str, Any]]:
        return self.api.list(RESOURCES[plural], self.namespace)

    def create(self, plural: str, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": API_VERSION, "kind": KIND_OF[plural], "metadata": {"name": name}, "spec": spec}
        created = self.api.create(RESOURCES[plural], self.namespace, body)  # a 422 is a usage error (main)
        if not created:
            raise PluginError(
                f"{KIND_OF[plural]} {name!r} already exists in namespace {self.namespace} (give another --name)",
                CONFLICT,
            )

    def patch(self, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        patched = self.api.patch(RESOURCES[plural], self.namespace, name, patch)  # a 422: a usage error (main)
        if patched is None:
            raise self._not_found(plural, name)
        return patched

    def secret_value(self, name: str, key: str, *, field: str) -> str:
        """One key of a Secret (read with the user's credentials), for a client; never printed."""
        try:
            secret = self.api.get(kube.SECRETS, self.namespace, name)
        except ApiException as error:
            if error.status == 403:
                raise PluginError(
                    f"reading the bucket needs get on Secret {name} ({field}) in namespace {self.namespace}: "
                    f"{kube.server_message(error)}",
                    API_ERROR,
                ) from None
            raise
        if secret is None:
            raise PluginError(f"{field}: Secret {name} not found in namespace {self.namespace}", NOT_FOUND)
        data = secret.get("data") or {}
        if key not in data:
            raise PluginError(f"{field}: Secret {name} has no key {key!r}", NOT_FOUND)
        return base64.b64decode(data[key]).decode()


# --- small helpers --------------------------------------------------------------------------------------


def _parse(model: type[BaseModel], spec: Any, *, what: str) -> Any:
    try:
        return model.model_validate(dict(spec or {}))
    except ValidationError as error:
        raise PluginError(f"{what}: {describe_validation_error(error)}", USAGE) from None


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _age(value: Any, *, now: datetime | None = None) -> str:
    """``41m``, ``3h``, ``30d`` as kubectl prints ages; ``in 5h`` for a time ahead; ``-`` for none."""
    moment = _time(value)
    if moment is None:
        return "-"
    seconds = int(((now or datetime.now(UTC)) - moment).total_seconds())
    ahead, seconds = seconds < 0, abs(seconds)
    for unit, size in (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size or (unit == "m" and seconds >= size):
            text = f"{seconds // size}{unit}"
            break
    else:
        text = f"{seconds}s"
    return f"in {text}" if ahead else text


def _size(value: Any) -> str:
    if value is None:
        return "-"
    number = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if number < 1024 or unit == "TiB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return str(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str("-" if c is None or c == "" else c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _condition(obj: Mapping[str, Any], type_: str) -> dict[str, Any]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    found: dict[str, Any] = next((c for c in conditions if c.get("type") == type_), {})
    return found


def _token() -> str:
    """A fresh value for a trigger field: when, and random so two in one second differ."""
    return f"kubectl-runbook-{format_timestamp(datetime.now(UTC))}-{secrets.token_hex(3)}"


def _progress(line: str) -> None:
    print(f"{datetime.now(UTC).strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _wait(
    read: Callable[[], dict[str, Any]],
    outcome: Callable[[dict[str, Any]], int | None],
    describe: Callable[[dict[str, Any]], list[str]],
    *,
    timeout: float,
    what: str,
) -> tuple[dict[str, Any], int]:
    """Poll ``read`` until ``outcome`` gives an exit code; print each new progress line of ``describe``."""
    deadline = time.monotonic() + timeout
    shown: list[str] = []
    while True:
        obj = read()
        for line in describe(obj):
            if line not in shown:
                shown.append(line)
                _progress(line)
        code = outcome(obj)
        if code is not None:
            return obj, code
        if time.monotonic() > deadline:
            phase = (obj.get("status") or {}).get("phase") or "no phase yet"
            raise PluginError(f"timed out after {timeout:.0f}s waiting for {what} (phase: {phase})", FAILED)
        time.sleep(POLL_SECONDS)


def _ready_line(obj: Mapping[str, Any]) -> str:
    ready = _condition(obj, "Ready")
    return f"{ready.get('reason') or '-'}: {ready.get('message') or ''}".rstrip(": ")


# --- status ---------------------------------------------------------------------------------------------


def _attention(obj: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    found = []
    for condition in (obj.get("status") or {}).get("conditions") or []:
        type_, status = condition.get("type"), condition.get("status")
        if (
            (type_ == "Ready" and status != "True")
            or (type_ in BAD_WHEN_TRUE and status == "True")
            or (type_ in BAD_WHEN_FALSE and status == "False")
        ):
            found.append(
                {
                    "kind": kind,
                    "name": obj["metadata"]["name"],
                    "type": type_,
                    "status": status,
                    "reason": condition.get("reason"),
                    "message": condition.get("message"),
                }
            )
    return found


def status(cluster: Cluster, _: argparse.Namespace) -> tuple[dict[str, Any], str]:
    lists = {plural: cluster.list(plural) for plural in KIND_OF}
    holder = holding_isolation(lists[ISOLATIONS])
    now = datetime.now(UTC)
    isolations = [
        {
            "name": i["metadata"]["name"],
            "holdsNamespace": holder is not None and holder["metadata"]["name"] == i["metadata"]["name"],
            "phase": (i.get("status") or {}).get("phase"),
            "severity": i["spec"].get("severity"),
            "incidentId": i["spec"].get("incidentId"),
            "reason": i["spec"].get("reason"),
            "scaled": (i.get("status") or {}).get("scaled"),
            "evidence": ((i.get("status") or {}).get("evidence") or {}).get("key"),
            "isolatedAt": (i.get("status") or {}).get("isolatedAt"),
            "created": i["metadata"].get("creationTimestamp"),
        }
        for i in lists[ISOLATIONS]
    ]
    backups = []
    for policy in lists[POLICIES]:
        state = policy.get("status") or {}
        success = state.get("lastSuccessfulBackup") or {}
        failure = state.get("lastFailure") or {}
        verified = state.get("lastVerifiedBackup") or {}
        finished = _time(success.get("time"))
        backups.append(
            {
                "name": policy["metadata"]["name"],
                "source": state.get("sourceKind"),
                "schedule": policy["spec"].get("schedule"),
                "suspended": bool(policy["spec"].get("suspend")),
                "lastSuccess": success.get("time"),
                "lastSuccessAgeSeconds": None if finished is None else int((now - finished).total_seconds()),
                "sizeBytes": success.get("sizeBytes"),
                "lastFailure": {"time": failure.get("time"), "reason": failure.get("reason")} if failure else None,
                "lastVerified": verified.get("verifiedTime"),
                "verifiedBackup": verified.get("key"),
                "ready": _condition(policy, "Ready").get("status"),
            }
        )
    rotations = []
    for rotation in lists[ROTATIONS]:
        state = rotation.get("status") or {}
        due = _time(state.get("nextRotationTime"))
        rotations.append(
            {
                "name": rotation["metadata"]["name"],
                "secret": (rotation["spec"].get("secretRef") or {}).get("name"),
                "lastRotation": state.get("lastRotationTime"),
                "nextRotation": state.get("nextRotationTime"),
                "overdue": due is not None and due < now,
                "step": state.get("step"),
                "phase": state.get("phase"),
            }
        )
    restores = [
        {
            "name": r["metadata"]["name"],
            "policy": r["spec"].get("policyRef"),
            "backup": (r.get("status") or {}).get("backupKey") or r["spec"].get("backup"),
            "dryRun": bool(r["spec"].get("dryRun")),
            "phase": (r.get("status") or {}).get("phase"),
            "created": r["metadata"].get("creationTimestamp"),
        }
        for r in sorted(lists[RESTORES], key=lambda r: r["metadata"].get("creationTimestamp", ""), reverse=True)[:5]
    ]
    attention = [line for plural, items in lists.items() for obj in items for line in _attention(obj, KIND_OF[plural])]
    data = {
        "namespace": cluster.namespace,
        "isolated": holder is not None,
        "isolations": isolations,
        "backups": backups,
        "rotations": rotations,
        "restores": restores,
        "notReady": attention,
    }
    return data, _status_text(data)


def _status_text(data: dict[str, Any]) -> str:
    parts = [f"Namespace {data['namespace']}: " + ("ISOLATED" if data["isolated"] else "not isolated")]
    parts.append("\nIsolations")
    parts.append(
        _table(
            ["NAME", "PHASE", "SEVERITY", "INCIDENT", "SCALED", "EVIDENCE", "AGE"],
            [
                [
                    i["name"] + (" *" if i["holdsNamespace"] else ""),
                    i["phase"],
                    i["severity"],
                    i["incidentId"],
                    i["scaled"],
                    i["evidence"],
                    _age(i["created"]),
                ]
                for i in data["isolations"]
            ],
        )
        if data["isolations"]
        else "  none"
    )
    parts.append("\nBackups")
    parts.append(
        _table(
            ["POLICY", "SOURCE", "LAST SUCCESS", "SIZE", "LAST FAILURE", "VERIFIED", "READY"],
            [
                [
                    b["name"] + (" (suspended)" if b["suspended"] else ""),
                    b["source"],
                    f"{_age(b['lastSuccess'])} ago" if b["lastSuccess"] else "never",
                    _size(b["sizeBytes"]),
                    f"{b['lastFailure']['reason']} {_age(b['lastFailure']['time'])} ago" if b["lastFailure"] else "-",
                    f"{_age(b['lastVerified'])} ago" if b["lastVerified"] else "never",
                    b["ready"],
                ]
                for b in data["backups"]
            ],
        )
        if data["backups"]
        else "  none"
    )
    parts.append("\nRotations")
    parts.append(
        _table(
            ["NAME", "SECRET", "LAST ROTATION", "NEXT", "STEP", "PHASE"],
            [
                [
                    r["name"],
                    r["secret"],
                    f"{_age(r['lastRotation'])} ago" if r["lastRotation"] else "never",
                    ("OVERDUE " if r["overdue"] else "") + (r["nextRotation"] or "on rotateNow"),
                    r["step"],
                    r["phase"],
                ]
                for r in data["rotations"]
            ],
        )
        if data["rotations"]
        else "  none"
    )
    if data["restores"]:
        parts.append("\nRestores (newest 5)")
        parts.append(
            _table(
                ["NAME", "POLICY", "BACKUP", "PHASE", "AGE"],
                [
                    [
                        r["name"],
                        r["policy"],
                        r["backup"] + (" (dry run)" if r["dryRun"] else ""),
                        r["phase"],
                        _age(r["created"]),
                    ]
                    for r in data["restores"]
                ],
            )
        )
    parts.append("\nConditions not Ready")
    parts.append(
        _table(
            ["KIND", "NAME", "CONDITION", "REASON", "MESSAGE"],
            [[a["kind"], a["name"], f"{a['type']}={a['status']}", a["reason"], a["message"]] for a in data["notReady"]],
        )
        if data["notReady"]
        else "  none: everything is Ready"
    )
    return "\n".join(parts)


# --- backups --------------------------------------------------------------------------------------------


def _bucket(cluster: Cluster, name: str) -> tuple[dict[str, Any], BackupPolicySpec, Any]:
    """The policy, its spec and an S3 client with the keys its Secret holds."""
    policy = cluster.get(POLICIES, name)
    spec: BackupPolicySpec = _parse(BackupPolicySpec, policy.get("spec"), what=f"BackupPolicy {name}")
    location = spec.destination.s3
    ref = location.credentials_secret_ref
    if ref is None:
        return policy, spec, s3.make_client(location)
    field = f"BackupPolicy {name} spec.destination.s3.credentialsSecretRef"
    key_id = cluster.secret_value(ref.name, ref.access_key_id_key, field=field)
    secret = cluster.secret_value(ref.name, ref.secret_access_key_key, field=field)
    return policy, spec, s3.make_client(location, key_id, secret)


def _s3_failure(error: Exception, bucket: str) -> PluginError:
    if isinstance(error, botocore.exceptions.ClientError):
        code = str(error.response.get("Error", {}).get("Code", "Error"))
        if code in ("404", "NoSuchBucket"):
            return PluginError(f"bucket {bucket} does not exist", NOT_FOUND)
        return PluginError(f"bucket {bucket}: {code}", API_ERROR)
    return PluginError(f"bucket {bucket} unreachable: {type(error).__name__}", API_ERROR)


def backup_list(cluster: Cluster, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    policy, spec, client = _bucket(cluster, args.policy)
    location = spec.destination.s3
    verified_key = ((policy.get("status") or {}).get("lastVerifiedBackup") or {}).get("key") or ""
    try:
        stored = list(reversed(stored_backups(client, location, cluster.namespace, args.policy)))
        shown = stored[: args.limit] if args.limit else stored
        backups = []
        for backup in shown:
            entry: dict[str, Any] = {
                "backup": backup.folder.rstrip("/").rsplit("/", 1)[-1],
                "key": backup.folder,
                "complete": backup.complete,
                "time": backup.time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            if backup.complete:
                manifest = s3.get_json(client, location, backup.folder + MANIFEST)
                data = manifest.get("data") or {}
                entry.update(
                    time=manifest.get("endTime") or entry["time"],
                    sizeBytes=data.get("sizeBytes"),
                    sha256=data.get("sha256"),
                    durationSeconds=manifest.get("durationSeconds"),
                    job=manifest.get("job"),
                    encryption=(manifest.get("encryption") or {}).get("mode"),
                    verified=bool(verified_key) and str(verified_key).startswith(backup.folder),
                )
            else:
                entry["verified"] = False
            backups.append(entry)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise _s3_failure(error, location.bucket) from None
    where = f"s3://{location.bucket}/{policy_folder(location, cluster.namespace, args.policy)}"
    data = {"policy": args.policy, "location": where, "total": len(stored), "backups": backups}
    rows = [
        [
            b["backup"],
            b["time"],
            _size(b.get("sizeBytes")),
            f"{b['durationSeconds']:.0f}s" if b.get("durationSeconds") is not None else "-",
            "yes" if b["verified"] else "-",
            "complete" if b["complete"] else "INCOMPLETE (no manifest)",
        ]
        for b in backups
    ]
    text = f"{where}: {len(stored)} backup(s)" + (f", newest {len(shown)} shown" if len(shown) < len(stored) else "")
    if rows:
        text += "\n" + _table(["BACKUP", "TIME", "SIZE", "DURATION", "VERIFIED", "STATE"], rows)
    return data, text


def backup_now(cluster: Cluster, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    cluster.get(POLICIES, args.policy)
    token = _token()
    cluster.patch(POLICIES, args.policy, {"metadata": {"annotations": {BACKUP_NOW: token}}})
    data = {"policy": args.policy, "annotation": BACKUP_NOW, "value": token, "started": False}
    if args.wait:

        def acted(obj: dict[str, Any]) -> int | None:
            return OK if (obj.get("status") or {}).get("backupNow") == token else None

        _wait(
            lambda: cluster.get(POLICIES, args.policy),
            acted,
            lambda obj: [f"waiting for the operator to start the backup Job ({_ready_line(obj)})"],
            timeout=args.timeout,
            what=f"BackupPolicy {args.policy} to start the backup",
        )
        data["started"] = True
    text = f"backup of BackupPolicy {cluster.namespace}/{args.policy} requested ({BACKUP_NOW}={token})"
    if data["started"]:
        text += "\nthe operator started its Job; `kubectl runbook backup list` shows it once its manifest is written"
    return data, text


# --- restore --------------------------------------------------------------------------------------------


def _workload(value: str) -> dict[str, str]:
    kind, _, name = value.rpartition("/")
    return {"kind": kind or "Deployment", "name": name}


def _secret_key(value: str) -> dict[str, str]:
    name, sep, key = value.partition("/")
    if not sep or not name or not key:
        raise argparse.ArgumentTypeError(f"{value!r}: expected SECRET/KEY")
    return {"name": name, "key": key}


def _check_backup_exists(cluster: Cluster, policy: str, backup: str) -> None:
    """Before anything is created: the backup named by --backup has a manifest in the bucket. Without read
    access to the policy's S3 Secret the check is left to the operator's preflight."""
    try:
        _, spec, client = _bucket(cluster, policy)
    except PluginError as error:
        if error.code != API_ERROR:
            raise
        _progress(f"warning: not checking that backup {backup!r} exists: {error.message}")
        return
    location = spec.destination.s3
    base = policy_folder(location, cluster.namespace, policy)
    folder = backup_folder(base, backup)
    if folder is None:
        raise PluginError(
            f"backup {backup!r} is neither 'latest', a backup's timestamp (YYYYMMDDTHHMMSSZ) nor a key under "
            f"s3://{location.bucket}/{base}",
            NOT_FOUND,
        )
    try:
        client.head_object(Bucket=location.bucket, Key=folder + MANIFEST)
    except botocore.exceptions.ClientError as error:
        if str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            raise PluginError(
                f"backup {backup!r} not found: no {MANIFEST} at s3://{location.bucket}/{folder} "
                f"(`kubectl runbook backup list {policy}` lists the backups)",
                NOT_FOUND,
            ) from None
        raise _s3_failure(error, location.bucket) from None
    except botocore.exceptions.BotoCoreError as error:
        raise _s3_failure(error, location.bucket) from None


def _restore_lines(obj: dict[str, Any]) -> list[str]:
    state = obj.get("status") or {}
    lines = []
    for step in state.get("steps") or []:
        lines.append(f"{step['name']}: {step['phase']}" + (f" ({step['message']})" if step.get("message") else ""))
    if state.get("phase") in RESTORE_DONE:
        lines.append(f"{state['phase']}: {_ready_line(obj)}")
    return lines


def restore(cluster: Cluster, args: argparse.Namespace) -> tuple[dict[str, Any], int, str]:
    cluster.get(POLICIES, args.policy)
    spec: dict[str, Any] = {"policyRef": args.policy, "backup": args.backup, "dryRun": args.dry_run}
    if args.decryption_secret:
        spec["decryptionSecretRef"] = args.decryption_secret
    if args.scale_down:
        spec["scaleDown"] = [_workload(w) for w in args.scale_down]
    if args.target_database:
        spec["target"] = {"database": args.target_database}
    _parse(BackupRestoreSpec, spec, what="the BackupRestore")
    if args.backup != "latest":
        _check_backup_exists(cluster, args.policy, args.backup)
    name = args.name or f"{args.policy}-restore-{format_timestamp(datetime.now(UTC)).lower()}"
    cluster.create(RESTORES, name, spec)
    data: dict[str, Any] = {"name": name, "namespace": cluster.namespace, "spec": spec}
    text = f"BackupRestore {cluster.namespace}/{name} created" + (" (dry run)" if args.dry_run else "")
    code = OK
    if args.wait:
        obj, code = _wait(
            lambda: cluster.get(RESTORES, name),
            lambda obj: RESTORE_DONE.get((obj.get("status") or {}).get("phase") or ""),
            _restore_lines,
            timeout=args.timeout,
            what=f"BackupRestore {name}",
        )
        state = obj.get("status") or {}
        data.update(phase=state.get("phase"), status=state)
        text += f"\n{state.get('phase')}: {_ready_line(obj)}"
        if code != OK:
            _progress(f"error: restore {name} failed: {_ready_line(obj)}")
    else:
        text += f"\nfollow it: kubectl get br {name} -n {cluster.namespace} -w"
    return data, code, text


# --- isolation ------------------------------------------------------------------------------------------


def _isolation_name(incident: str) -> str:
    return "incident-" + incident.lower().replace("_", "-").replace(".", "-").strip("-")[:240]


def _evidence_from(cluster: Cluster, policy: str, prefix: str) -> dict[str, Any]:
    """Evidence stored like the policy's backups: its bucket, keys and encryption, under ``prefix``."""
    spec: BackupPolicySpec = _parse(
        BackupPolicySpec, cluster.get(POLICIES, policy).get("spec"), what=f"BackupPolicy {policy}"
    )
    destination = spec.destination.s3.model_copy(update={"prefix": prefix})
    return {"capture": True, "destination": destination.to_api(), "encryption": spec.encryption.to_api()}


def _isolation_lines(obj: dict[str, Any]) -> list[str]:
    state = obj.get("status") or {}
    if not state.get("phase"):
        return ["waiting for the operator"]
    line = f"{state['phase']}"
    ready = _condition(obj, "Ready")
    if ready.get("status") == "False":
        line += f": {_ready_line(obj)}"
    elif state.get("scaled"):
        line += f": scaled {state['scaled']}"
    return [line]


def _holder_text(holder: Mapping[str, Any]) -> str:
    spec, state = holder.get("spec") or {}, holder.get("status") or {}
    return (
        f"EmergencyIsolation {holder['metadata']['name']!r} (incident {spec.get('incidentId')}, "
        f"severity {spec.get('severity')}, phase {state.get('phase') or 'new'})"
    )


def isolate(cluster: Cluster, args: argparse.Namespace) -> tuple[dict[str, Any], int, str]:
    if args.no_evidence:
        evidence: dict[str, Any] = {"capture": False}
    elif args.evidence_from:
        evidence = _evidence_from(cluster, args.evidence_from, args.evidence_prefix)
    else:
        raise PluginError(
            "evidence capture needs a store: give --evidence-from POLICY (a BackupPolicy whose bucket, keys and "
            "encryption to use) or --no-evidence",
            USAGE,
        )
    spec = {
        "reason": args.reason,
        "incidentId": args.incident,
        "severity": args.severity,
        "network": {"isolate": True, "allowDNS": args.allow_dns},
        "evidence": evidence,
    }
    _parse(EmergencyIsolationSpec, spec, what="the EmergencyIsolation")
    holder = holding_isolation(cluster.list(ISOLATIONS))
    if holder is not None:
        raise PluginError(
            f"namespace {cluster.namespace} is already isolated by {_holder_text(holder)}; "
            f"release it first: kubectl runbook release -n {cluster.namespace}",
            CONFLICT,
        )
    name = args.name or _isolation_name(args.incident)
    cluster.create(ISOLATIONS, name, spec)
    data: dict[str, Any] = {"name": name, "namespace": cluster.namespace, "spec": spec}
    text = f"EmergencyIsolation {cluster.namespace}/{name} created"
    code = OK
    if args.wait:
        obj, code = _wait(
            lambda: cluster.get(ISOLATIONS, name),
            lambda obj: ISOLATION_DONE.get((obj.get("status") or {}).get("phase") or ""),
            _isolation_lines,
            timeout=args.timeout,
            what=f"EmergencyIsolation {name} to be Isolated",
        )
        state = obj.get("status") or {}
        data.update(phase=state.get("phase"), status=state)
        text += f"\n{state.get('phase')}" + (f": scaled {state['scaled']}" if state.get("scaled") else "")
        if code == CONFLICT:  # another isolation was created between the check and ours
            _progress(f"error: namespace {cluster.namespace} is already isolated: {_ready_line(obj)}")
        elif code != OK:
            _progress(f"error: EmergencyIsolation {name}: {_ready_line(obj)}")
    return data, code, text


def release(cluster: Cluster, args: argparse.Namespace) -> tuple[dict[str, Any], int, str]:
    if args.name:
        target = cluster.get(ISOLATIONS, args.name)
    else:
        holder = holding_isolation(cluster.list(ISOLATIONS))
        if holder is None:
            raise PluginError(f"no active EmergencyIsolation in namespace {cluster.namespace}", NOT_FOUND)
        target = dict(holder)
    name = target["metadata"]["name"]
    if not (target.get("spec") or {}).get("released"):
        cluster.patch(ISOLATIONS, name, {"spec": {"released": True}})
    data: dict[str, Any] = {"name": name, "namespace": cluster.namespace, "released": True}
    text = f"EmergencyIsolation {cluster.namespace}/{name} released (spec.released: true)"
    code = OK
    if args.wait:
        obj, code = _wait(
            lambda: cluster.get(ISOLATIONS, name),
            lambda obj: OK if (obj.get("status") or {}).get("phase") in ("Released", "Rejected") else None,
            _isolation_lines,
            timeout=args.timeout,
            what=f"EmergencyIsolation {name} to be Released",
        )
        data.update(phase=(obj.get("status") or {}).get("phase"))
        text += f"\n{data['phase']}: workloads back at their recorded replicas"
    return data, code, text


# --- rotation -------------------------------------------------------------------------------------------


def rotate_now(cluster: Cluster, args: argparse.Namespace) -> tuple[dict[str, Any], int, str]:
    cluster.get(ROTATIONS, args.rotation)
    token = _token()
    cluster.patch(ROTATIONS, args.rotation, {"spec": {"rotateNow": token}})
    data: dict[str, Any] = {"rotation": args.rotation, "namespace": cluster.namespace, "rotateNow": token}
    text = f"rotation of SecretRotation {cluster.namespace}/{args.rotation} requested (spec.rotateNow={token})"
    code = OK
    if args.wait:

        def outcome(obj: dict[str, Any]) -> int | None:
            state = obj.get("status") or {}
            if state.get("rotateNow") != token:
                return None
            if state.get("step") == "Done":
                return OK
            return FAILED if state.get("phase") == "Failed" else None

        def lines(obj: dict[str, Any]) -> list[str]:
            state = obj.get("status") or {}
            if state.get("phase") == "Paused":
                return [f"Paused: {_condition(obj, 'Paused').get('message') or ''}"]
            if state.get("rotateNow") != token:
                return ["waiting for the operator"]
            return [f"step {state.get('step')}" + (f" ({_ready_line(obj)})" if state.get("phase") == "Failed" else "")]

        obj, code = _wait(
            lambda: cluster.get(ROTATIONS, args.rotation),
            outcome,
            lines,
            timeout=args.timeout,
            what=f"SecretRotation {args.rotation} to rotate",
        )
        state = obj.get("status") or {}
        data.update(step=state.get("step"), phase=state.get("phase"), fingerprint=state.get("fingerprint"))
        text += f"\nrotated: step {state.get('step')}, fingerprint {state.get('fingerprint')}"
        if code != OK:
            _progress(f"error: rotation {args.rotation} failed: {_ready_line(obj)}")
    return data, code, text


# --- the command line -----------------------------------------------------------------------------------


def _duration(value: str) -> float:
    try:
        return float(value) if value.isdigit() else parse_duration(value).total_seconds()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected seconds or a duration like 90s, 10m, 1h") from None


def build_parser() -> argparse.ArgumentParser:
    # On the top level and on every command (SUPPRESS: a command's own default does not hide the top's).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="Path to the kubeconfig file.")
    common.add_argument("--context", default=argparse.SUPPRESS, help="The kubeconfig context to use.")
    common.add_argument(
        "-n", "--namespace", default=argparse.SUPPRESS, help="Namespace (default: the context's namespace)."
    )
    common.add_argument(
        "-o", "--output", choices=["human", "json", "yaml"], default=argparse.SUPPRESS, help="Output format."
    )
    parser = argparse.ArgumentParser(
        prog="kubectl runbook",
        description="The runbook's incident commands for runbook.dev resources.",
        epilog="Exit codes: 0 done, 1 cluster or bucket unreachable or refused, 2 bad input, 3 not found, "
        "4 failed or timed out while waiting, 5 refused by the cluster's state (already isolated, name taken).",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(subparsers: Any, name: str, help_: str, func: Any) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = subparsers.add_parser(name, help=help_, description=help_, parents=[common])
        sub.set_defaults(func=func)
        return sub

    def waiting(sub: argparse.ArgumentParser, default: str) -> None:
        sub.add_argument("--wait", action="store_true", help="Wait for the outcome, showing progress on stderr.")
        sub.add_argument(
            "--timeout", type=_duration, default=_duration(default), help=f"How long --wait waits ({default})."
        )

    command(
        commands, "status", "One screen for an incident: isolations, backups, rotations, what is not Ready.", status
    )

    backup = commands.add_parser("backup", help="Backups of a BackupPolicy: now, list.", parents=[common])
    backups = backup.add_subparsers(dest="backup_command", required=True, metavar="COMMAND")
    now = command(backups, "now", "Start one backup now (the runbook.dev/backup-now annotation).", backup_now)
    now.add_argument("policy", metavar="POLICY")
    waiting(now, "2m")
    listing = command(
        backups, "list", "The bucket's backups of a policy, newest first, from their manifests.", backup_list
    )
    listing.add_argument("policy", metavar="POLICY")
    listing.add_argument("--limit", type=int, default=20, help="Show the newest N (default 20; 0: all).")

    sub = command(commands, "restore", "Restore a policy's backup (creates a BackupRestore).", restore)
    sub.add_argument("policy", metavar="POLICY")
    sub.add_argument("--backup", default="latest", metavar="KEY", help="'latest' (default), a timestamp or a key.")
    sub.add_argument("--dry-run", action="store_true", help="Only verify the backup and the target.")
    sub.add_argument("--name", help="Name of the BackupRestore (default: <policy>-restore-<timestamp>).")
    sub.add_argument(
        "--decryption-secret",
        type=_secret_key,
        metavar="SECRET/KEY",
        help="The private key for a public-key policy.",
    )
    sub.add_argument(
        "--scale-down",
        action="append",
        default=[],
        metavar="[KIND/]NAME",
        help="A workload to stop during the restore (repeatable; kind Deployment by default).",
    )
    sub.add_argument("--target-database", help="Restore into this database instead of the policy's.")
    waiting(sub, "1h")

    sub = command(commands, "isolate", "Isolate the namespace (creates an EmergencyIsolation).", isolate)
    sub.add_argument("--incident", required=True, metavar="ID", help="The incident's identifier, e.g. INC-2026-0042.")
    sub.add_argument("--severity", required=True, choices=["P1", "P2", "P3", "P4"])
    sub.add_argument("--reason", required=True, metavar="TEXT")
    evidence = sub.add_mutually_exclusive_group()
    evidence.add_argument("--no-evidence", action="store_true", help="Do not capture evidence.")
    evidence.add_argument(
        "--evidence-from", metavar="POLICY", help="Store evidence with this BackupPolicy's bucket, keys and encryption."
    )
    sub.add_argument("--evidence-prefix", default="incidents", help="Key prefix of the evidence (default incidents).")
    sub.add_argument("--allow-dns", action="store_true", help="Still allow DNS lookups to kube-system.")
    sub.add_argument("--name", help="Name of the EmergencyIsolation (default: incident-<id>).")
    waiting(sub, "5m")

    sub = command(commands, "release", "Release the namespace's active isolation (or the named one).", release)
    sub.add_argument("name", nargs="?", metavar="ISOLATION")
    waiting(sub, "5m")

    rotate = commands.add_parser("rotate", help="Secret rotations: now.", parents=[common])
    rotations = rotate.add_subparsers(dest="rotate_command", required=True, metavar="COMMAND")
    sub = command(rotations, "now", "Rotate one SecretRotation now (a new spec.rotateNow).", rotate_now)
    sub.add_argument("rotation", metavar="ROTATION")
    waiting(sub, "15m")
    return parser


def _emit(data: Any, text: str, output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2, default=str))
    elif output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
    else:
        print(text)


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cluster = Cluster.connect(
            kubeconfig=getattr(args, "kubeconfig", None),
            context=getattr(args, "context", None),
            namespace=getattr(args, "namespace", None),
        )
        result = args.func(cluster, args)
    except PluginError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return error.code
    except ApiException as error:
        if error.status == 422:  # the object as asked for is invalid (the CRD's schema or CEL rules)
            print(f"error: the API server refused it: {kube.server_message(error)}", file=sys.stderr)
            return USAGE
        print(f"error: the API server said {error.status}: {kube.server_message(error)}", file=sys.stderr)
        return API_ERROR
    except (urllib3.exceptions.HTTPError, OSError) as error:
        print(f"error: cannot reach the API server: {type(error).__name__}: {error}", file=sys.stderr)
        return API_ERROR
    data, code, text = result if len(result) == 3 else (result[0], OK, result[1])
    _emit(data, text, getattr(args, "output", "human"))
    return int(code)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
