"""The tenancy rules: what an object may make the operator reach, from its own namespace and the RunbookGrants
a cluster administrator made for that namespace (README "Security model").

Without a grant an object reaches only its own namespace: a host must be a Service of that namespace (a
selector-backed one: an ExternalName or hand-written endpoints could point anywhere), an export covers only
that namespace, S3 is AWS with keys from the namespace's own Secret, and every connection uses TLS. Each
``check_*`` function raises ``RunbookError`` (reason ``NotPermitted``) naming the field and the grant field
that would allow it; the reconcilers call them before any credential, byte or connection leaves.

The grants come from kopf's index ``grants_by_namespace`` (main.py): ``grants_for(index, namespace)``.
Reconcilers call one ``confine_*`` per kind, which checks every such field of the spec and returns the spec
with the hosts to connect to; they then use only the returned spec.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from ..clients import kube
from ..errors import RunbookError, describe_validation_error
from ..models.backup import BackupPolicySpec, BackupRestoreSpec, BackupSource, RestoreTarget
from ..models.grants import RunbookGrantSpec, normal_endpoint, normal_host
from ..models.isolation import EmergencyIsolationSpec
from ..models.rotation import PostgresRotationTarget, RedisRotationTarget, SecretRotationSpec
from ..models.sources import PostgresConnection, RedisConnection, RedisTLS, S3Location, plaintext_problem

LOG = logging.getLogger(__name__)
Connection = PostgresConnection | RedisConnection | PostgresRotationTarget | RedisRotationTarget
PG = TypeVar("PG", PostgresConnection, PostgresRotationTarget)
RD = TypeVar("RD", RedisConnection, RedisRotationTarget)
NOT_PERMITTED = "NotPermitted"
CLUSTER_DOMAIN = "cluster.local"
# A PostgreSQL database name as the operator accepts it: never '=' or spaces (libpq would read
# "dbname=prod host=..." as a connection string), never a leading '-' (an option to pg_restore).
DATABASE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")
AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-[0-9]{1,2}$")


@dataclass(frozen=True)
class Grant:
    """One RunbookGrant as the index keeps it: its name (for messages) and its parsed spec."""

    name: str
    spec: RunbookGrantSpec


Grants = Collection[Grant]


def index_entries(name: str, spec: Mapping[str, Any]) -> dict[str, Grant]:
    """The values of kopf's index for one RunbookGrant: the grant under each namespace it lists. A grant the
    models reject (the API server let it through) grants nothing and is logged."""
    try:
        parsed = RunbookGrantSpec.model_validate(dict(spec))
    except ValidationError as error:
        LOG.warning("RunbookGrant %s grants nothing: %s", name, describe_validation_error(error))
        return {}
    grant = Grant(name, parsed)
    return {namespace: grant for namespace in parsed.namespaces}


def grants_for(index: Mapping[str, Iterable[Grant]], namespace: str) -> tuple[Grant, ...]:
    """The grants that apply to ``namespace``, from kopf's index (``grants_by_namespace``), by name."""
    return tuple(sorted(index.get(namespace, ()), key=lambda grant: grant.name))


def _shown(value: str) -> str:
    """An untrusted string as it may appear in a message: short, and quoted when it is not plain."""
    short = value[:100] + ("..." if len(value) > 100 else "")
    return short if re.fullmatch(r"[A-Za-z0-9.:_/\-\[\]]+", short) else repr(short)


def _refused(field: str, message: str) -> RunbookError:
    return RunbookError(NOT_PERMITTED, f"{field}: {message}")


# --- hosts ---------------------------------------------------------------------------------------------


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _service_of(name: str, namespace: str) -> tuple[str, str] | None:
    """(service, namespace) when ``name`` (normalised) is one of a Service's DNS forms: ``svc``, ``svc.ns``,
    ``svc.ns.svc``, ``svc.ns.svc.cluster.local``; a relative form is the object's own namespace."""
    labels = name.split(".")
    if len(labels) == 1:
        return labels[0], namespace
    if len(labels) == 2 or (len(labels) == 3 and labels[2] == "svc"):
        return labels[0], labels[1]
    if len(labels) == 5 and ".".join(labels[2:]) == f"svc.{CLUSTER_DOMAIN}":
        return labels[0], labels[1]
    return None


def check_host(api: kube.Api, grants: Grants, namespace: str, field: str, *, host: str, port: int) -> str:
    """The host to connect to for ``host``:``port`` named by ``field`` of an object in ``namespace``, or
    ``RunbookError``. Allowed: exactly a ``hosts`` entry of a grant (as written there), or a selector-backed
    Service of the object's own namespace in any DNS form, returned as ``<svc>.<namespace>.svc`` (connect
    to that, never to the object's string: a relative name resolves in the connecting pod's namespace)."""
    try:
        name = normal_host(host)
    except ValueError as why:
        # the string itself is not repeated: it may hold anything, e.g. user:password@host
        raise _refused(field, f"not a plain host name or address: {why}") from None
    for grant in grants:
        if any(entry.host == name and entry.port == port for entry in grant.spec.hosts):
            return name
    advice = f"no RunbookGrant for {namespace} lists it with port {port} in spec.hosts"
    if name == "localhost" or name.endswith(".localhost"):
        raise _refused(field, f"{name} is the connecting pod itself, not a Service of namespace {namespace}")
    if _is_address(name):
        raise _refused(field, f"{name} is an IP address, not a Service of namespace {namespace}, and {advice}")
    service = _service_of(name, namespace)
    if service is None:
        raise _refused(field, f"{name} is not a Service of namespace {namespace} and {advice}")
    service_name, service_namespace = service
    if service_namespace != namespace:
        raise _refused(field, f"{name} is a Service of namespace {service_namespace}, not of {namespace}, and {advice}")
    found = api.get(kube.SERVICES, namespace, service_name)
    if found is None:
        raise RunbookError(
            "ServiceNotFound", f"{field}: {name}: no Service {service_name} in namespace {namespace}", retry_after=60
        )
    spec = found.get("spec") or {}
    if spec.get("type") == "ExternalName":
        raise _refused(field, f"Service {service_name} is an ExternalName (it points outside the namespace): {advice}")
    if not spec.get("selector"):
        raise _refused(
            field,
            f"Service {service_name} has no selector (its endpoints are written by hand and may point "
            f"anywhere): {advice}",
        )
    return f"{service_name}.{namespace}.svc"


def check_plaintext(grants: Grants, namespace: str, field: str) -> None:
    """A connection without TLS (``field`` names where TLS would be configured) needs a grant with
    ``plaintextConnections``; the caller shows a Warning condition whenever one is used."""
    if not any(grant.spec.plaintext_connections for grant in grants):
        raise _refused(
            field,
            f"a connection without verified TLS is not allowed in namespace {namespace}: configure TLS, or a cluster "
            "administrator sets plaintextConnections in a RunbookGrant for it",
        )


# --- S3 ------------------------------------------------------------------------------------------------


def check_s3(grants: Grants, namespace: str, field: str, location: S3Location) -> None:
    """An S3 location (``field``, e.g. ``spec.destination.s3``) of an object in ``namespace``. Allowed: AWS
    (no endpoint) with keys from ``credentialsSecretRef``; a custom endpoint only as a grant's ``s3`` entry
    lists it (and the bucket, when the entry lists buckets); no ``credentialsSecretRef`` (the operator's own
    ambient credentials) only where that entry has ``ambientCredentials`` and lists the bucket."""
    endpoint = None
    if location.endpoint is not None:
        try:
            endpoint = normal_endpoint(location.endpoint)
        except ValueError as why:
            raise _refused(f"{field}.endpoint", str(why)) from None
    elif not AWS_REGION.fullmatch(location.region):
        raise _refused(f"{field}.region", "not an AWS region (e.g. us-east-1); a custom endpoint needs a grant")
    entries = [
        entry
        for grant in grants
        for entry in grant.spec.s3
        if (entry.endpoint is None and endpoint is None)
        or (entry.endpoint is not None and endpoint is not None and normal_endpoint(entry.endpoint) == endpoint)
    ]
    where = "AWS S3" if endpoint is None else endpoint
    if endpoint is not None and not any(not e.buckets or location.bucket in e.buckets for e in entries):
        listed = "" if not entries else f" with bucket {location.bucket}"
        raise _refused(
            f"{field}.endpoint",
            f"{endpoint} is not AWS S3 and no RunbookGrant for {namespace} lists it{listed} in spec.s3",
        )
    if location.credentials_secret_ref is None and not any(
        e.ambient_credentials and location.bucket in e.buckets for e in entries
    ):
        raise _refused(
            f"{field}.credentialsSecretRef",
            f"required: the operator's own S3 credentials are used for bucket {location.bucket} at {where} only "
            f"when a RunbookGrant for {namespace} lists it in spec.s3 with ambientCredentials",
        )


# --- namespaces and names ------------------------------------------------------------------------------


def check_export_namespace(grants: Grants, namespace: str, field: str, exported: str) -> None:
    """A namespace exported (or restored from an export) by an object in ``namespace`` (``field``): its own
    always, others only when a grant lists them."""
    if exported != namespace and exported not in {n for grant in grants for n in grant.spec.export_namespaces}:
        raise _refused(
            field,
            f"{_shown(exported)} is not namespace {namespace} and no RunbookGrant for {namespace} lists it "
            "in spec.exportNamespaces",
        )


def check_export_namespaces(grants: Grants, namespace: str, field: str, namespaces: Iterable[str]) -> None:
    """The namespaces a BackupPolicy in ``namespace`` exports (``field``, e.g.
    ``spec.source.kubernetes.namespaces``), each by ``check_export_namespace``."""
    for position, exported in enumerate(namespaces):
        check_export_namespace(grants, namespace, f"{field}[{position}]", exported)


def check_database_name(field: str, name: str) -> str:
    """A PostgreSQL database name (``field``): letters, digits, '_' and '-', 1-63 characters, not starting
    with '-'. Pass it to libpq as a quoted name (``dbname``), never as a connection string."""
    if not DATABASE_NAME.fullmatch(name):
        raise RunbookError(
            "InvalidDatabaseName",
            f"{field}: not a database name (letters, digits, '_' and '-', at most 63 characters, not starting "
            "with '-'; never '=' or spaces, which libpq reads as a connection string)",
        )
    return name


# --- every field of each kind --------------------------------------------------------------------------
# One call per kind checks every field of its spec that reaches beyond the namespace and returns the spec
# with each host replaced by the one to connect to (check_host); reconcilers use the returned spec only.


def _verified(tls: RedisTLS | None) -> bool:
    """Whether a Redis connection uses TLS that authenticates the server (insecureSkipVerify does not)."""
    return tls is not None and tls.enabled and not tls.insecure_skip_verify


def _unverified(connection: Connection) -> bool:
    if isinstance(connection, PostgresConnection | PostgresRotationTarget):
        return connection.tls is None
    return not _verified(connection.tls)


def check_connection_tls(
    grants: Grants,
    namespace: str,
    field: str,
    connection: Connection,
) -> None:
    """A connection without verified TLS needs a grant's ``plaintextConnections`` (and the object's own
    ``insecurePlaintext`` opt-out: ``plaintext_in_use``, which the reconcilers call after ``confine_*``)."""
    if _unverified(connection):
        check_plaintext(grants, namespace, f"{field}.tls")


def _postgres(api: kube.Api, grants: Grants, namespace: str, field: str, connection: PG) -> PG:
    host = check_host(api, grants, namespace, f"{field}.host", host=connection.host, port=connection.port)
    check_database_name(f"{field}.database", connection.database)
    check_connection_tls(grants, namespace, field, connection)
    return connection.model_copy(update={"host": host})


def _redis(api: kube.Api, grants: Grants, namespace: str, field: str, connection: RD) -> RD:
    host = check_host(api, grants, namespace, f"{field}.host", host=connection.host, port=connection.port)
    check_connection_tls(grants, namespace, field, connection)
    return connection.model_copy(update={"host": host})


def confine_backup_policy(api: kube.Api, grants: Grants, namespace: str, spec: BackupPolicySpec) -> BackupPolicySpec:
    """``spec.source`` (hosts, database, TLS, exported namespaces), ``spec.destination.s3`` and the drills'
    ``spec.verification.target`` (each field over the source's, as drills resolve it)."""
    source = spec.source
    update: dict[str, Any] = {}
    if source.postgresql is not None:
        update["postgresql"] = _postgres(api, grants, namespace, "spec.source.postgresql", source.postgresql)
    if source.redis is not None:
        update["redis"] = _redis(api, grants, namespace, "spec.source.redis", source.redis)
    confined = source.model_copy(update=update)
    if source.kubernetes is not None:
        check_export_namespaces(grants, namespace, "spec.source.kubernetes.namespaces", source.kubernetes.namespaces)
    check_s3(grants, namespace, "spec.destination.s3", spec.destination.s3)
    verification = spec.verification
    if verification is not None:
        target = _restore_target(
            api, grants, namespace, "spec.verification.target", target=verification.target, source=source
        )
        verification = verification.model_copy(update={"target": target})
    return spec.model_copy(update={"source": confined, "verification": verification})


def _restore_target(
    api: kube.Api, grants: Grants, namespace: str, field: str, *, target: RestoreTarget, source: BackupSource
) -> RestoreTarget:
    """A restore or drill target: the fields it sets, each over the policy's source (checked with the policy)."""
    update: dict[str, Any] = {}
    if source.postgresql is not None and (target.host is not None or target.port is not None):
        port = target.port or source.postgresql.port
        update["host"] = check_host(
            api, grants, namespace, f"{field}.host", host=target.host or source.postgresql.host, port=port
        )
    if target.database is not None:
        check_database_name(f"{field}.database", target.database)
    scratch = target.redis
    if source.redis is not None and scratch is not None:
        check_connection_tls(grants, namespace, f"{field}.redis", scratch.resolve(source.redis))  # tls alone too
        if scratch.host is not None or scratch.port is not None:
            port = scratch.port or source.redis.port
            host = check_host(
                api, grants, namespace, f"{field}.redis.host", host=scratch.host or source.redis.host, port=port
            )
            update["redis"] = scratch.model_copy(update={"host": host})
    return target.model_copy(update=update)


def confine_backup_restore(
    api: kube.Api, grants: Grants, namespace: str, spec: BackupRestoreSpec, policy: BackupPolicySpec
) -> BackupRestoreSpec:
    """``spec.target`` (over ``policy``'s source: pass the policy as ``confine_backup_policy`` returned it, so
    that fields left out resolve to its checked hosts), ``spec.kubernetes.targetNamespace`` (the restore's
    own namespace only) and ``spec.kubernetes.namespace`` (a section the namespace may export today)."""
    kubernetes = spec.kubernetes
    if kubernetes is not None and kubernetes.target_namespace not in (None, namespace):
        raise _refused(
            "spec.kubernetes.targetNamespace",
            f"{kubernetes.target_namespace} is not namespace {namespace}: a restore applies only into its own",
        )
    if kubernetes is not None and kubernetes.namespace is not None:
        check_export_namespace(grants, namespace, "spec.kubernetes.namespace", kubernetes.namespace)
    if spec.target is None:
        return spec
    target = _restore_target(api, grants, namespace, "spec.target", target=spec.target, source=policy.source)
    return spec.model_copy(update={"target": target})


def confine_secret_rotation(
    api: kube.Api, grants: Grants, namespace: str, spec: SecretRotationSpec
) -> SecretRotationSpec:
    """``spec.target.postgresql`` or ``spec.target.redis``: host, database name, TLS."""
    target = spec.target
    if target is None:
        return spec
    update: dict[str, Any] = {}
    if target.postgresql is not None:
        update["postgresql"] = _postgres(api, grants, namespace, "spec.target.postgresql", target.postgresql)
    if target.redis is not None:
        update["redis"] = _redis(api, grants, namespace, "spec.target.redis", target.redis)
    return spec.model_copy(update={"target": target.model_copy(update=update)})


def confine_emergency_isolation(grants: Grants, namespace: str, spec: EmergencyIsolationSpec) -> None:
    """``spec.evidence.destination``: the evidence bucket."""
    if spec.evidence.destination is not None:
        check_s3(grants, namespace, "spec.evidence.destination", spec.evidence.destination)


# --- what runs without verified TLS (the SecureConnections condition) ----------------------------------


def plaintext_in_use(*connections: tuple[str, Connection | None]) -> list[str]:
    """The object's side of a connection without verified TLS, after ``confine_*`` checked the grant's: the
    fields of the (field, connection) pairs that run without verified TLS (for the ``SecureConnections``
    Warning condition), or ``NotPermitted`` naming the field of one whose login has no ``insecurePlaintext``
    opt-out (``sources.plaintext_problem``). Called before any Secret of those connections is read."""
    for field, connection in connections:
        problem = None if connection is None else plaintext_problem(connection, field)
        if problem is not None:
            raise RunbookError(NOT_PERMITTED, problem)
    return [field for field, connection in connections if connection is not None and _unverified(connection)]


def grants_from_index(index: Mapping[str, Iterable[Grant]]) -> Callable[[str], tuple[Grant, ...]]:
    """``Context.grants`` (``runtime.drive(..., grants=...)``) answered from kopf's index ``grants_by_namespace``."""
    return functools.partial(grants_for, index)
