"""Connection descriptions shared by backups, restores and rotations: databases, caches, S3, GPG."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from .common import CamelModel, ConfigMapKeyRef, CredentialsSecretRef, ObjectName, Port, SecretKeyRef, cel

if TYPE_CHECKING:
    from .rotation import PostgresRotationTarget, RedisRotationTarget

# The keys of a kubernetes.io/tls Secret.
TLS_CERT_KEY = "tls.crt"
TLS_KEY_KEY = "tls.key"


class TLSSecretRef(CamelModel):
    """A Secret of the ``kubernetes.io/tls`` shape: the certificate (PEM, with its chain) in ``tls.crt`` and its
    private key in ``tls.key``."""

    name: ObjectName = Field(description="Name of the Secret (keys tls.crt and tls.key).")


REDIS_COMMAND = r"^[^\s]+$"
FINGERPRINT = r"^([0-9A-Fa-f]{40}|[0-9A-Fa-f]{64})$"


class RedisTLS(CamelModel):
    """TLS towards Redis (the runbook's Redis listens with TLS on 6380 and requires client certificates)."""

    enabled: bool = Field(True, description="Connect with TLS.")
    ca_secret_ref: SecretKeyRef | None = Field(None, description="CA certificate (PEM) to verify the server.")
    client_certificate_secret_ref: TLSSecretRef | None = Field(
        None,
        description="Client certificate and key for mutual TLS (tls-auth-clients yes), from a kubernetes.io/tls "
        "Secret; mounted as files, never in the environment.",
    )
    server_name: str | None = Field(
        None,
        description="Name sent as SNI and expected in the server's certificate; the host when absent "
        "(e.g. the Service's DNS name when host is an address).",
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$",
    )
    insecure_skip_verify: bool = Field(False, description="Do not verify the server certificate (tests only).")


class RedisCommands(CamelModel):
    """Names of the commands the backup agent sends, for a server that renames them (rename-command)."""

    bgsave: str = Field(
        "BGSAVE",
        description="BGSAVE, e.g. the runbook's HIPAA_BGSAVE_i9j0k1l2.",
        min_length=1,
        max_length=128,
        pattern=REDIS_COMMAND,
    )
    lastsave: str = Field("LASTSAVE", description="LASTSAVE.", min_length=1, max_length=128, pattern=REDIS_COMMAND)
    info: str = Field("INFO", description="INFO.", min_length=1, max_length=128, pattern=REDIS_COMMAND)


# Every PostgreSQL login of the operator and its agents: libpq's require_auth=scram-sha-256.
SCRAM_ONLY = (
    "Every login requires SCRAM-SHA-256 (libpq require_auth=scram-sha-256), with or without TLS: a server that "
    "asks for a cleartext or MD5 password gets no password and the connection fails."
)


class PostgresTLS(CamelModel):
    """Verified TLS towards PostgreSQL (libpq ``sslmode=verify-full``)."""

    ca_secret_ref: SecretKeyRef = Field(
        description="Secret key holding the CA certificate (PEM) the server's certificate must chain to; the "
        "certificate must also name the connection's host (a DNS name, or an IP address SAN when host is an "
        "address), as libpq's sslmode=verify-full checks."
    )


class PostgresConnection(CamelModel):
    """A PostgreSQL server, database and login."""

    host: str = Field(
        description="Host name or address of the server, e.g. postgresql.<namespace>.svc.", min_length=1, max_length=253
    )
    port: Port = Field(5432, description="Server port.")
    database: str = Field(description="Database name.", min_length=1, max_length=63)
    credentials_secret_ref: CredentialsSecretRef = Field(description="Secret with the login's user name and password.")
    tls: PostgresTLS | None = Field(
        None,
        description="Verified TLS: the server must present a certificate for host signed by this CA "
        "(sslmode=verify-full). Required unless insecurePlaintext is true. " + SCRAM_ONLY,
    )
    insecure_plaintext: bool = Field(
        False,
        description="Connect without verified TLS (the server is not authenticated; the connection is encrypted "
        "only when the server offers TLS): an explicit opt-out, shown as a Warning condition. Ignored when tls "
        "is set. " + SCRAM_ONLY,
    )


class RedisConnection(CamelModel):
    """A Redis server."""

    host: str = Field(description="Host name or address of the server.", min_length=1, max_length=253)
    port: Port = Field(6379, description="Server port.")
    tls: RedisTLS | None = Field(None, description="TLS settings; plain TCP when absent.")
    username: str | None = Field(None, description="ACL user name; the default user when absent.", min_length=1)
    password_secret_ref: SecretKeyRef | None = Field(None, description="Secret key holding the password.")
    commands: RedisCommands = Field(
        default_factory=RedisCommands, description="Command names, when the server renames them."
    )
    insecure_plaintext: bool = Field(
        False,
        description="Send the password (AUTH) over plain TCP, without TLS: an explicit opt-out, shown as a "
        "Warning condition. Without it, a password needs tls. Ignored when tls is enabled.",
    )


def plaintext_problem(
    connection: PostgresConnection | RedisConnection | PostgresRotationTarget | RedisRotationTarget, field: str
) -> str | None:
    """The one-line reason this connection may not be used as configured, naming ``field`` (the connection's
    path in the spec, e.g. ``spec.source.postgresql``), or None: a login without TLS needs the explicit
    ``insecurePlaintext`` opt-out. A PostgreSQL connection always logs in; a Redis one when it has a password
    (a rotation's Redis target always: its admin login)."""
    from .rotation import PostgresRotationTarget  # that module builds on this one

    if connection.insecure_plaintext:
        return None
    if isinstance(connection, PostgresConnection | PostgresRotationTarget):
        if connection.tls is not None:
            return None
        return (
            f"{field}: the login would cross the network without verified TLS: set {field}.tls.caSecretRef, "
            f"or {field}.insecurePlaintext: true to accept that"
        )
    logs_in = connection.password_secret_ref is not None if isinstance(connection, RedisConnection) else True
    if not logs_in or (connection.tls is not None and connection.tls.enabled):
        return None
    return (
        f"{field}: the password would be sent over plain TCP: set {field}.tls, "
        f"or {field}.insecurePlaintext: true to accept that"
    )


class S3Credentials(CamelModel):
    """A Secret holding S3 access keys."""

    name: ObjectName = Field(description="Name of the Secret.")
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID", description="Key holding the access key id.", min_length=1)
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY", description="Key holding the secret access key.", min_length=1
    )


class S3Location(CamelModel):
    """An S3 (or S3-compatible) bucket and key prefix."""

    bucket: str = Field(
        description="Bucket name.", min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$"
    )
    prefix: str = Field(
        "", description="Key prefix, without a trailing slash.", max_length=512, pattern=r"^([^/].*[^/]|[^/])?$"
    )
    region: str = Field("us-east-1", description="Region of the bucket.", min_length=1)
    endpoint: str | None = Field(
        None, description="Endpoint URL of an S3-compatible service; AWS when absent.", pattern=r"^https?://"
    )
    credentials_secret_ref: S3Credentials | None = Field(
        None, description="Secret with access keys; the pod's ambient credentials (IRSA) when absent."
    )
    server_side_encryption: Literal["AES256", "aws:kms", "None"] = Field(
        "AES256", description="Server-side encryption on top of GPG; None for services that lack it."
    )
    kms_key_id: str | None = Field(None, description="KMS key for aws:kms.")


class GPGEncryption(CamelModel):
    """GPG encryption: to public keys (preferred: the cluster never holds a decryption key) or symmetric."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "has(self.recipientsConfigMapRef) != has(self.passphraseSecretRef)",
                "set exactly one of recipientsConfigMapRef and passphraseSecretRef",
            ),
        )
    )

    recipients_config_map_ref: ConfigMapKeyRef | None = Field(
        None, description="ConfigMap key holding one or more ASCII-armored public keys to encrypt to."
    )
    passphrase_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a passphrase for symmetric AES256 encryption (the runbook's way)."
    )
    fingerprints: list[Annotated[str, StringConstraints(pattern=FINGERPRINT)]] = Field(
        default_factory=list,
        max_length=16,
        description="Fingerprints (40 or 64 hex digits) the recipients' keys must have: the ConfigMap must hold "
        "exactly these keys, so whoever may edit it cannot swap a key in. Without pins the keys are used as "
        "found and the RecipientsPinned condition says False.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> GPGEncryption:
        if (self.recipients_config_map_ref is None) == (self.passphrase_secret_ref is None):
            raise ValueError("set exactly one of recipientsConfigMapRef and passphraseSecretRef")
        return self


class Encryption(CamelModel):
    """How stored bytes are encrypted."""

    gpg: GPGEncryption = Field(description="GPG encryption settings.")
