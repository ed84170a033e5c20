"""The tenancy rules (reconcilers/tenancy.py) and the RunbookGrant model: what an object may make the operator
reach beyond its own namespace, every refusal naming the field and the grant field that would allow it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from runbook_operator.clients.kube import SERVICES
from runbook_operator.errors import RunbookError
from runbook_operator.models.backup import BackupPolicySpec, BackupRestoreSpec
from runbook_operator.models.grants import RunbookGrantSpec, normal_endpoint, normal_host
from runbook_operator.models.isolation import EmergencyIsolationSpec
from runbook_operator.models.rotation import SecretRotationSpec
from runbook_operator.models.sources import S3Location
from runbook_operator.reconcilers import tenancy
from tests.fake_api import FakeApi
from tests.helpers import DELETE, load_samples, with_change

NS = "team-a"
FIELD = "spec.target.host"


def grant(name: str = "g", **spec: Any) -> tenancy.Grant:
    return tenancy.Grant(name, RunbookGrantSpec.model_validate({"namespaces": [NS], **spec}))


def api_with_services() -> FakeApi:
    api = FakeApi()
    api.put(SERVICES, NS, {"metadata": {"name": "postgresql"}, "spec": {"selector": {"app": "postgresql"}}})
    api.put(SERVICES, NS, {"metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "evil.x"}})
    api.put(SERVICES, NS, {"metadata": {"name": "manual"}, "spec": {"ports": [{"port": 5432}]}})
    api.put(SERVICES, "team-b", {"metadata": {"name": "postgresql"}, "spec": {"selector": {"app": "postgresql"}}})
    return api


def refused(call: Any, *args: Any, **kwargs: Any) -> RunbookError:
    with pytest.raises(RunbookError) as info:
        call(*args, **kwargs)
    return info.value


# --- hosts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "postgresql",
        "POSTGRESQL",
        "postgresql.",
        "postgresql.team-a",
        "postgresql.team-a.svc",
        "postgresql.team-a.svc.",
        "PostgreSQL.Team-A.SVC",
        "postgresql.team-a.svc.cluster.local",
        "postgresql.team-a.svc.cluster.local.",
    ],
)
def test_every_dns_form_of_an_own_service_is_allowed_and_connects_by_its_namespaced_name(host: str) -> None:
    """The canonical name is returned: a relative name would resolve in the connecting pod's namespace (the
    operator's own, for rotations)."""
    assert tenancy.check_host(api_with_services(), (), NS, FIELD, host=host, port=5432) == "postgresql.team-a.svc"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("db.evil.example", "db.evil.example is not a Service of namespace team-a and no RunbookGrant"),
        ("postgresql.team-b", "is a Service of namespace team-b, not of team-a"),
        ("postgresql.team-b.svc", "is a Service of namespace team-b"),
        ("postgresql.team-b.svc.cluster.local", "is a Service of namespace team-b"),
        ("kubernetes.default.svc", "is a Service of namespace default"),
        ("postgresql.team-a.svc.other.domain", "is not a Service of namespace team-a"),
        ("postgresql.team-a.pod", "is not a Service of namespace team-a"),
        ("localhost", "is the connecting pod itself"),
        ("LOCALHOST.", "is the connecting pod itself"),
        ("db.localhost", "is the connecting pod itself"),
        ("127.0.0.1", "127.0.0.1 is an IP address"),
        ("10.96.0.1", "is an IP address"),
        ("169.254.169.254", "is an IP address"),
        ("::1", "::1 is an IP address"),
        ("fd00::1", "is an IP address"),
        ("::ffff:127.0.0.1", "canonical form ::ffff:7f00:1"),
        ("::ffff:7f00:1", "is an IP address"),
        ("2130706433", "non-standard form"),  # 127.0.0.1 as one number
        ("127.1", "non-standard form"),
        ("0x7f.1", "non-standard form"),
        ("0x7f000001", "non-standard form"),
        ("0177.0.0.1", "non-standard form"),
        ("127.0.0.01", "non-standard form"),
        ("1.2.3.4.5", "non-standard form"),
        ("0x7f", "non-standard form"),
        ("db:5432", "a port belongs in the port field"),
        ("postgresql.team-a.svc:5432", "a port belongs in the port field"),
        ("user@postgresql", "user info"),
        ("a@b", "user info"),
        ("postgresql%2eteam-b", "percent-encoding"),
        ("fe80::1%eth0", "percent-encoding or an IPv6 zone"),
        ("[::1]", "brackets"),
        ("[fd00::1]:5432", "brackets"),
        ("/var/run/postgresql", "Unix socket directory"),
        ("postgresql,evil.example", "several hosts"),
        (" postgresql", "whitespace"),
        ("postgresql\n", "whitespace"),
        ("post gresql", "only ASCII letters"),
        ("postgres\x00ql", "only ASCII letters"),
        ("pöstgresql", "only ASCII letters"),
        ("postgresql..team-a", "not a DNS name"),
        ("-postgresql", "not a DNS name"),
        ("postgresql-.team-a", "not a DNS name"),
        ("postgres_ql", "not a DNS name"),
        ("a" * 64, "not a DNS name"),
        (".".join(["a"] * 130), "not a DNS name"),
        ("", "empty"),
        ("FD00::0:1", "canonical form fd00::1"),
        ("dbname=prod", "not a DNS name"),
        ("dbname=prod host=evil", "only ASCII letters"),
        ("user:secret@postgresql", "user info"),
    ],
)
def test_a_host_that_is_not_an_own_service_is_refused_naming_the_field(host: str, expected: str) -> None:
    error = refused(tenancy.check_host, api_with_services(), (), NS, FIELD, host=host, port=5432)
    assert error.reason == tenancy.NOT_PERMITTED
    assert error.message.startswith(f"{FIELD}: ")
    assert expected in error.message, error.message
    assert "\n" not in error.message and "\x00" not in error.message and "secret" not in error.message


def test_a_service_that_could_point_anywhere_is_refused() -> None:
    api = api_with_services()
    external = refused(tenancy.check_host, api, (), NS, FIELD, host="ext", port=5432)
    assert "ExternalName" in external.message and external.reason == tenancy.NOT_PERMITTED
    manual = refused(tenancy.check_host, api, (), NS, FIELD, host="manual.team-a.svc", port=5432)
    assert "has no selector" in manual.message
    missing = refused(tenancy.check_host, api, (), NS, FIELD, host="redis", port=6379)
    assert missing.reason == "ServiceNotFound" and missing.retry_after is not None
    assert missing.message == f"{FIELD}: redis: no Service redis in namespace team-a"


def test_a_granted_host_is_allowed_exactly_with_its_port() -> None:
    grants = [
        grant(
            hosts=[
                {"host": "db.shared.example", "port": 5432},
                {"host": "10.0.0.5", "port": 6379},
                {"host": "fd00::5", "port": 6379},
                {"host": "postgresql.team-b.svc", "port": 5432},
            ]
        )
    ]
    api = FakeApi()
    assert tenancy.check_host(api, grants, NS, FIELD, host="DB.Shared.Example.", port=5432) == "db.shared.example"
    assert tenancy.check_host(api, grants, NS, FIELD, host="10.0.0.5", port=6379) == "10.0.0.5"
    assert tenancy.check_host(api, grants, NS, FIELD, host="fd00::5", port=6379) == "fd00::5"
    assert tenancy.check_host(api, grants, NS, FIELD, host="postgresql.team-b.svc", port=5432)
    assert api.calls == []  # a granted host needs no Service
    for host, port in [
        ("db.shared.example", 5433),
        ("shared.example", 5432),
        ("x.db.shared.example", 5432),
        ("10.0.0.5", 5432),
        ("010.0.0.5", 6379),
        ("167772165", 6379),  # 10.0.0.5 as one number
        ("::ffff:10.0.0.5", 6379),
        ("postgresql.team-b", 5432),  # another spelling of a granted Service is not the granted string
    ]:
        error = refused(tenancy.check_host, api_with_services(), grants, NS, FIELD, host=host, port=port)
        assert error.reason == tenancy.NOT_PERMITTED, host
        assert error.message.startswith(f"{FIELD}: "), error.message


def test_grants_of_other_namespaces_do_not_apply() -> None:
    index = {
        "team-b": [tenancy.Grant("b", RunbookGrantSpec(namespaces=["team-b"], hosts=[{"host": "db.x", "port": 1}]))]
    }
    assert tenancy.grants_for(index, NS) == ()
    refused(tenancy.check_host, FakeApi(), tenancy.grants_for(index, NS), NS, FIELD, host="db.x", port=1)
    assert tenancy.check_host(FakeApi(), tenancy.grants_for(index, "team-b"), "team-b", FIELD, host="db.x", port=1)


def test_the_index_keeps_a_grant_under_each_namespace_and_drops_an_invalid_one() -> None:
    entries = tenancy.index_entries("g", {"namespaces": ["team-a", "team-b"], "plaintextConnections": True})
    assert set(entries) == {"team-a", "team-b"} and entries["team-a"].name == "g"
    assert entries["team-b"].spec.plaintext_connections
    assert tenancy.index_entries("bad", {"namespaces": ["team-a"], "hosts": [{"host": "127.1", "port": 1}]}) == {}
    index = {"team-a": [grant("z"), grant("a")]}
    assert [g.name for g in tenancy.grants_for(index, NS)] == ["a", "z"]


# --- plaintext -----------------------------------------------------------------------------------------


def test_plaintext_needs_a_grant() -> None:
    error = refused(tenancy.check_plaintext, [grant()], NS, "spec.source.redis.tls")
    assert error.reason == tenancy.NOT_PERMITTED
    assert error.message.startswith(
        "spec.source.redis.tls: a connection without verified TLS is not allowed in namespace"
    )
    assert "plaintextConnections" in error.message
    tenancy.check_plaintext([grant(), grant("p", plaintextConnections=True)], NS, "spec.source.redis.tls")


# --- S3 ------------------------------------------------------------------------------------------------

KEYS = {"credentialsSecretRef": {"name": "s3-keys"}}
S3 = "spec.destination.s3"


def location(**fields: Any) -> S3Location:
    return S3Location.model_validate({"bucket": "team-a-backups", **fields})


def test_aws_with_own_keys_needs_no_grant() -> None:
    tenancy.check_s3((), NS, S3, location(**KEYS))
    tenancy.check_s3((), NS, S3, location(region="eu-central-1", **KEYS))


@pytest.mark.parametrize("region", ["evil.example", "us-east-1.evil", "US-EAST-1", "x", "us-east-1/"])
def test_an_aws_region_that_is_not_one_is_refused(region: str) -> None:
    error = refused(tenancy.check_s3, (), NS, S3, location(region=region, **KEYS))
    assert error.message.startswith(f"{S3}.region: ")


def test_ambient_credentials_need_a_grant_for_the_bucket() -> None:
    error = refused(tenancy.check_s3, (), NS, S3, location())
    assert error.reason == tenancy.NOT_PERMITTED
    assert error.message.startswith(f"{S3}.credentialsSecretRef: required")
    assert "ambientCredentials" in error.message and "team-a-backups" in error.message
    aws = [grant(s3=[{"buckets": ["team-a-backups"], "ambientCredentials": True}])]
    tenancy.check_s3(aws, NS, S3, location())
    refused(tenancy.check_s3, aws, NS, S3, location(bucket="team-b-backups"))
    # an AWS grant gives no ambient credentials towards a custom endpoint, nor the reverse
    refused(tenancy.check_s3, aws, NS, S3, location(endpoint="https://minio.storage:9000"))
    minio = [grant(s3=[{"endpoint": "https://minio.storage:9000", "buckets": ["team-a-backups"]}])]
    refused(tenancy.check_s3, minio, NS, S3, location(endpoint="https://minio.storage:9000"))
    refused(tenancy.check_s3, minio, NS, S3, location())


def test_a_custom_endpoint_needs_a_grant_listing_it_and_the_bucket() -> None:
    error = refused(tenancy.check_s3, (), NS, S3, location(endpoint="https://s3.evil.example", **KEYS))
    assert error.message == (
        f"{S3}.endpoint: https://s3.evil.example is not AWS S3 and no RunbookGrant for team-a lists it in spec.s3"
    )
    grants = [
        grant(s3=[{"endpoint": "https://minio.storage:9000", "buckets": ["team-a-backups"]}]),
        grant("any", s3=[{"endpoint": "http://garage.storage.svc:3900"}]),
    ]
    for endpoint in ["https://minio.storage:9000", "https://MINIO.Storage:9000/", "https://minio.storage:9000/"]:
        tenancy.check_s3(grants, NS, S3, location(endpoint=endpoint, **KEYS))
    tenancy.check_s3(grants, NS, S3, location(endpoint="http://garage.storage.svc:3900", bucket="any-bucket", **KEYS))
    wrong_bucket = refused(
        tenancy.check_s3, grants, NS, S3, location(endpoint="https://minio.storage:9000", bucket="other", **KEYS)
    )
    assert "with bucket other in spec.s3" in wrong_bucket.message
    for endpoint in [
        "https://minio.storage",  # another port
        "http://minio.storage:9000",  # another scheme
        "https://minio.storage:9000.evil.example",
        "https://minio.storage:9000@evil.example",
        "https://evil.example#@minio.storage:9000",
        "https://minio.storage:9000/bucket",
        "https://minio.storage:9000?x=1",
        "https://user:pw@minio.storage:9000",
        "https://minio%2estorage:9000",
        "https://127.0.0.1:9000",
        "https://2130706433:9000",
        "https://minio.storage:09000",
        "https://minio.storage:99999",
    ]:
        error = refused(tenancy.check_s3, grants, NS, S3, location(endpoint=endpoint, **KEYS))
        assert error.message.startswith(f"{S3}.endpoint: "), endpoint
        assert "pw" not in error.message


def test_default_ports_are_the_same_endpoint() -> None:
    assert normal_endpoint("https://s3.example:443") == normal_endpoint("https://s3.example") == "https://s3.example"
    assert normal_endpoint("http://s3.example:80") == "http://s3.example"
    assert normal_endpoint("http://[fd00::1]:9000") == "http://[fd00::1]:9000"


# --- export namespaces and database names --------------------------------------------------------------

EXPORT = "spec.source.kubernetes.namespaces"


def test_export_of_the_own_namespace_only_unless_granted() -> None:
    tenancy.check_export_namespaces((), NS, EXPORT, [NS])
    error = refused(tenancy.check_export_namespaces, (), NS, EXPORT, [NS, "kube-system"])
    assert error.message == (
        f"{EXPORT}[1]: kube-system is not namespace team-a and no RunbookGrant for team-a lists it in "
        "spec.exportNamespaces"
    )
    grants = [grant(exportNamespaces=["team-a-jobs"])]
    tenancy.check_export_namespaces(grants, NS, EXPORT, [NS, "team-a-jobs"])
    for other in ["runbook-system", "team-b", "TEAM-A-JOBS"]:
        refused(tenancy.check_export_namespaces, grants, NS, EXPORT, [other])


@pytest.mark.parametrize("name", ["hungryhippaahneties_db", "scratch", "Drill-2026", "a", "_x", "a" * 63])
def test_database_names_that_are_names(name: str) -> None:
    assert tenancy.check_database_name("spec.target.database", name) == name


@pytest.mark.parametrize(
    "name",
    [
        "dbname=prod",
        "dbname=prod host=evil",
        "prod host=x",
        "",
        "a" * 64,
        "-x",
        "db;drop",
        "db'x",
        'db"x',
        "postgresql://evil/prod",
        "db\n",
        "d b",
        "d%b",
        "db.prod",
        "дб",
    ],
)
def test_database_names_that_libpq_could_read_otherwise_are_refused(name: str) -> None:
    error = refused(tenancy.check_database_name, "spec.target.database", name)
    assert error.reason == "InvalidDatabaseName" and error.message.startswith("spec.target.database: ")
    assert "\n" not in error.message


# --- the grant's own validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "namespaces"),
        ({"namespaces": []}, "namespaces"),
        ({"namespaces": ["Team_A"]}, "namespaces.0"),
        ({"namespaces": [NS], "hosts": [{"host": "db.x", "port": 0}]}, "hosts.0.port"),
        ({"namespaces": [NS], "hosts": [{"host": "db.x", "port": 65536}]}, "hosts.0.port"),
        ({"namespaces": [NS], "hosts": [{"host": "db.x"}]}, "hosts.0.port"),
        ({"namespaces": [NS], "hosts": [{"host": "DB.x", "port": 1}]}, "hosts.0.host"),
        ({"namespaces": [NS], "hosts": [{"host": "127.1", "port": 1}]}, "non-standard form"),
        ({"namespaces": [NS], "hosts": [{"host": "db:5432", "port": 1}]}, "port field"),
        ({"namespaces": [NS], "hosts": [{"host": "FD00::1", "port": 1}]}, "hosts.0.host"),
        ({"namespaces": [NS], "s3": [{"endpoint": "https://minio/path"}]}, "s3.0.endpoint"),
        ({"namespaces": [NS], "s3": [{"endpoint": "ftp://minio"}]}, "s3.0.endpoint"),
        ({"namespaces": [NS], "s3": [{"endpoint": "https://minio:0"}]}, "s3.0.endpoint"),
        ({"namespaces": [NS], "s3": [{"buckets": ["Bad_Bucket"]}]}, "s3.0.buckets.0"),
        ({"namespaces": [NS], "s3": [{"ambientCredentials": True}]}, "ambientCredentials needs buckets"),
        ({"namespaces": [NS], "exportNamespaces": ["kube system"]}, "exportNamespaces.0"),
        ({"namespaces": [NS], "plaintext": True}, "plaintext"),
    ],
)
def test_a_bad_grant_is_rejected_naming_the_field(spec: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError) as info:
        RunbookGrantSpec.model_validate(spec)
    assert expected in str(info.value)


def test_normal_host_is_one_reading_for_grants_and_objects() -> None:
    assert normal_host("DB.Example.") == "db.example"
    with pytest.raises(ValueError, match="canonical form fd00::1"):
        normal_host("FD00:0::1")
    assert normal_host("10.0.0.5.") == "10.0.0.5"


# --- one call per kind ---------------------------------------------------------------------------------

RUNBOOK = "hungryhippaahneties"
SAMPLES = load_samples()


def runbook_api() -> FakeApi:
    api = FakeApi()
    for name in ("postgresql", "redis", "postgresql-scratch"):
        api.put(SERVICES, RUNBOOK, {"metadata": {"name": name}, "spec": {"selector": {"app": name}}})
    return api


# The samples name the local cluster's S3 API server, which the sample RunbookGrant lists: every check of a
# sample below has that grant; PLAINTEXT adds plaintext connections.
SAMPLE_S3 = [
    tenancy.Grant(
        "s3", RunbookGrantSpec.model_validate({"namespaces": [RUNBOOK], "s3": SAMPLES["runbookgrant"]["spec"]["s3"]})
    )
]
PLAINTEXT = [
    tenancy.Grant("p", RunbookGrantSpec(namespaces=[RUNBOOK], plaintext_connections=True)),
    *SAMPLE_S3,
]


def test_the_runbook_samples_pass_with_canonical_hosts_and_plaintext_needs_a_grant() -> None:
    policy = BackupPolicySpec.model_validate(SAMPLES["backuppolicy-postgresql"]["spec"])
    error = refused(tenancy.confine_backup_policy, runbook_api(), SAMPLE_S3, RUNBOOK, policy)
    assert error.message.startswith("spec.source.postgresql.tls: a connection without verified TLS is not allowed")
    confined = tenancy.confine_backup_policy(runbook_api(), PLAINTEXT, RUNBOOK, policy)
    assert confined.source.postgresql is not None
    assert confined.source.postgresql.host == "postgresql.hungryhippaahneties.svc"
    assert confined.destination == policy.destination

    redis = BackupPolicySpec.model_validate(SAMPLES["backuppolicy-redis"]["spec"])
    assert tenancy.confine_backup_policy(runbook_api(), SAMPLE_S3, RUNBOOK, redis).source.redis is not None
    export = BackupPolicySpec.model_validate(SAMPLES["backuppolicy-kubernetes"]["spec"])
    assert tenancy.confine_backup_policy(runbook_api(), SAMPLE_S3, RUNBOOK, export) == export

    rotation = SecretRotationSpec.model_validate(SAMPLES["secretrotation"]["spec"])
    error = refused(tenancy.confine_secret_rotation, runbook_api(), SAMPLE_S3, RUNBOOK, rotation)
    assert error.message.startswith("spec.target.postgresql.tls: ")
    assert tenancy.confine_secret_rotation(runbook_api(), PLAINTEXT, RUNBOOK, rotation).target is not None

    restore = BackupRestoreSpec.model_validate(SAMPLES["backuprestore"]["spec"])
    assert tenancy.confine_backup_restore(runbook_api(), SAMPLE_S3, RUNBOOK, restore, confined) == restore


def test_every_host_field_is_checked_and_replaced() -> None:
    base = SAMPLES["backuppolicy-postgresql"]["spec"]
    short = BackupPolicySpec.model_validate(
        with_change({"spec": base}, "spec.source.postgresql.host", "postgresql")["spec"]
    )
    confined = tenancy.confine_backup_policy(runbook_api(), PLAINTEXT, RUNBOOK, short)
    assert (
        confined.source.postgresql is not None
        and confined.source.postgresql.host == "postgresql.hungryhippaahneties.svc"
    )
    drills = {
        "schedule": "0 4 * * 0",
        "target": {"host": "postgresql-scratch", "database": "scratch"},
        "decryptionSecretRef": {"name": "k", "key": "k"},
    }
    with_drills = BackupPolicySpec.model_validate({**base, "verification": drills})
    confined = tenancy.confine_backup_policy(runbook_api(), PLAINTEXT, RUNBOOK, with_drills)
    assert confined.verification is not None
    assert confined.verification.target.host == "postgresql-scratch.hungryhippaahneties.svc"
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (
            BackupPolicySpec,
            with_change({"spec": base}, "spec.source.postgresql.host", "db.evil.example")["spec"],
            "spec.source.postgresql.host: db.evil.example is not a Service",
        ),
        (
            BackupPolicySpec,
            with_change({"spec": base}, "spec.source.postgresql.database", "dbname=prod")["spec"],
            "spec.source.postgresql.database: not a database name",
        ),
        (
            BackupPolicySpec,
            {**base, "verification": {**drills, "target": {"host": "10.0.0.9"}}},
            "spec.verification.target.host: 10.0.0.9 is an IP address",
        ),
        (
            BackupPolicySpec,
            {**base, "verification": {**drills, "target": {"database": "dbname=prod host=x"}}},
            "spec.verification.target.database: ",
        ),
        (
            BackupPolicySpec,
            with_change({"spec": base}, "spec.destination.s3.endpoint", "https://s3.evil.example")["spec"],
            "spec.destination.s3.endpoint: https://s3.evil.example is not AWS S3",
        ),
        (
            BackupPolicySpec,
            with_change({"spec": base}, "spec.destination.s3.credentialsSecretRef", DELETE)["spec"],
            "spec.destination.s3.credentialsSecretRef: required",
        ),
        (
            BackupPolicySpec,
            with_change(
                {"spec": SAMPLES["backuppolicy-kubernetes"]["spec"]},
                "spec.source.kubernetes.namespaces",
                [RUNBOOK, "kube-system"],
            )["spec"],
            "spec.source.kubernetes.namespaces[1]: kube-system",
        ),
        (
            BackupPolicySpec,
            with_change(
                {"spec": SAMPLES["backuppolicy-redis"]["spec"]}, "spec.source.redis.host", "redis.runbook-system.svc"
            )["spec"],
            "spec.source.redis.host: redis.runbook-system.svc is a Service of namespace runbook-system",
        ),
        (
            SecretRotationSpec,
            with_change({"spec": SAMPLES["secretrotation"]["spec"]}, "spec.target.postgresql.host", "127.0.0.1")[
                "spec"
            ],
            "spec.target.postgresql.host: 127.0.0.1 is an IP address",
        ),
        (
            SecretRotationSpec,
            with_change(
                {"spec": SAMPLES["secretrotation"]["spec"]}, "spec.target.postgresql.database", "postgres host=evil"
            )["spec"],
            "spec.target.postgresql.database: ",
        ),
    ]
    for model, spec, expected in cases:
        parsed = model.model_validate(spec)
        check = tenancy.confine_backup_policy if model is BackupPolicySpec else tenancy.confine_secret_rotation
        error = refused(check, runbook_api(), PLAINTEXT, RUNBOOK, parsed)
        assert error.message.startswith(expected), (expected, error.message)


def test_redis_without_tls_needs_the_plaintext_grant() -> None:
    spec = with_change({"spec": SAMPLES["backuppolicy-redis"]["spec"]}, "spec.source.redis.tls", DELETE)["spec"]
    parsed = BackupPolicySpec.model_validate(spec)
    error = refused(tenancy.confine_backup_policy, runbook_api(), SAMPLE_S3, RUNBOOK, parsed)
    assert error.message.startswith("spec.source.redis.tls: a connection without verified TLS")
    assert tenancy.confine_backup_policy(runbook_api(), PLAINTEXT, RUNBOOK, parsed).source.redis is not None
    unverified = with_change(
        {"spec": SAMPLES["backuppolicy-redis"]["spec"]}, "spec.source.redis.tls.insecureSkipVerify", True
    )
    error = refused(
        tenancy.confine_backup_policy,
        runbook_api(),
        SAMPLE_S3,
        RUNBOOK,
        BackupPolicySpec.model_validate(unverified["spec"]),
    )
    assert error.message.startswith("spec.source.redis.tls: a connection without verified TLS")


def test_a_restore_target_is_checked_over_the_policy_source() -> None:
    policy = tenancy.confine_backup_policy(
        runbook_api(), PLAINTEXT, RUNBOOK, BackupPolicySpec.model_validate(SAMPLES["backuppolicy-postgresql"]["spec"])
    )
    restore = SAMPLES["backuprestore"]["spec"]
    for target, expected in [
        ({"host": "db.evil.example"}, "spec.target.host: db.evil.example is not a Service"),
        ({"port": 5433, "host": "postgresql.team-b.svc"}, "spec.target.host: postgresql.team-b.svc is a Service of"),
        ({"database": "dbname=prod"}, "spec.target.database: not a database name"),
    ]:
        spec = BackupRestoreSpec.model_validate({**restore, "target": target})
        error = refused(tenancy.confine_backup_restore, runbook_api(), PLAINTEXT, RUNBOOK, spec, policy)
        assert error.message.startswith(expected), error.message
    moved = BackupRestoreSpec.model_validate({**restore, "target": {"port": 5433}})
    confined = tenancy.confine_backup_restore(runbook_api(), SAMPLE_S3, RUNBOOK, moved, policy)
    assert confined.target is not None and confined.target.host == "postgresql.hungryhippaahneties.svc"
    elsewhere = BackupRestoreSpec.model_validate({**restore, "kubernetes": {"targetNamespace": "kube-system"}})
    error = refused(tenancy.confine_backup_restore, runbook_api(), SAMPLE_S3, RUNBOOK, elsewhere, policy)
    assert error.message.startswith("spec.kubernetes.targetNamespace: kube-system is not namespace")


def test_a_restore_target_that_only_weakens_the_redis_tls_still_needs_the_grant() -> None:
    """A Redis target setting only ``tls`` (no host or port) connects to the source's host without verified
    TLS: the plaintext rule applies to it as to any connection."""
    policy = tenancy.confine_backup_policy(
        runbook_api(), SAMPLE_S3, RUNBOOK, BackupPolicySpec.model_validate(SAMPLES["backuppolicy-redis"]["spec"])
    )
    redis = SAMPLES["backuppolicy-redis"]["spec"]["source"]["redis"]
    weakened = {**redis["tls"], "insecureSkipVerify": True}
    spec = BackupRestoreSpec.model_validate({"policyRef": "cache", "target": {"redis": {"tls": weakened}}})
    error = refused(tenancy.confine_backup_restore, runbook_api(), SAMPLE_S3, RUNBOOK, spec, policy)
    assert error.message.startswith("spec.target.redis.tls: a connection without verified TLS"), error.message


def test_a_kubernetes_restore_section_of_another_namespace_needs_the_export_grant() -> None:
    policy = BackupPolicySpec.model_validate(SAMPLES["backuppolicy-kubernetes"]["spec"])
    spec = BackupRestoreSpec.model_validate({"policyRef": "config", "kubernetes": {"namespace": "team-b"}})
    error = refused(tenancy.confine_backup_restore, runbook_api(), SAMPLE_S3, RUNBOOK, spec, policy)
    assert error.message.startswith("spec.kubernetes.namespace: "), error.message
    own = BackupRestoreSpec.model_validate({"policyRef": "config", "kubernetes": {"namespace": RUNBOOK}})
    assert tenancy.confine_backup_restore(runbook_api(), SAMPLE_S3, RUNBOOK, own, policy) == own


def test_the_evidence_bucket_follows_the_s3_rules() -> None:
    spec = EmergencyIsolationSpec.model_validate(
        {
            "reason": "r",
            "incidentId": "INC-1",
            "evidence": {"destination": {"bucket": "evidence", "endpoint": "https://x.example"}},
        }
    )
    error = refused(tenancy.confine_emergency_isolation, (), RUNBOOK, spec)
    assert error.message.startswith("spec.evidence.destination.endpoint: ")
    tenancy.confine_emergency_isolation((), RUNBOOK, EmergencyIsolationSpec(reason="r", incident_id="INC-1"))
