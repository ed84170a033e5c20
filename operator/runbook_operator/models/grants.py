"""RunbookGrant: what a cluster administrator allows the objects of some namespaces beyond their own namespace.

Cluster-scoped, so only whoever holds RBAC on ``runbookgrants`` (cluster administrators; the operator only
reads them) can widen what a namespace's BackupPolicies, BackupRestores and SecretRotations may reach.
Without a grant an object may use only its own namespace: its Services as hosts, its own namespace as an
export, AWS S3 with credentials from its own Secret (``reconcilers/tenancy.py`` states the rules).

``normal_host`` and ``normal_endpoint`` are the one reading of an untrusted host or endpoint string: the
grant's entries and the objects' fields go through the same functions, so equal means equal.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from .common import DNS_LABEL, CamelModel, Port, StatusBase, cel

_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_NAME = rf"^{_LABEL}(\.{_LABEL})*$"
_DNS_NAME = re.compile(DNS_NAME)
# Labels that libc's inet_aton reads as parts of an IPv4 address (127.1, 0x7f.1, 2130706433, 0177.0.0.1).
_NUMERIC = re.compile(r"^((0x[0-9a-f]*|[0-9]+)\.){0,3}(0x[0-9a-f]*|[0-9]+)$")
_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
# scheme://host[:port] and nothing else: no user info, path, query or fragment.
ENDPOINT = rf"^https?://({_LABEL}(\.{_LABEL})*|\[[0-9a-f:.]+\])(:{_PORT})?$"
_ENDPOINT = re.compile(rf"^(?P<scheme>https?)://(?P<host>{_LABEL}(\.{_LABEL})*|\[[0-9a-f:.]+\])(:(?P<port>{_PORT}))?$")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
BUCKET = r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$"


def normal_host(value: str) -> str:
    """``value`` as a plain host: a DNS name (lower case, no trailing dot) or an IP address in its canonical
    text form. ValueError says why anything else (a port, user info, percent-encoding, brackets, a path or
    Unix socket directory, several hosts, an IPv4 address written as a number or with fewer parts) is not."""
    text = value.strip()
    if text != value or not text:
        raise ValueError("empty or surrounded by whitespace")
    for char, why in (
        ("@", "user info (@) is not part of a host"),
        ("%", "percent-encoding or an IPv6 zone (%) is not part of a host"),
        ("/", "a path or a Unix socket directory (/) is not a host"),
        (",", "several hosts (,) are not one host"),
        ("[", "brackets: write the address itself"),
        ("]", "brackets: write the address itself"),
    ):
        if char in text:
            raise ValueError(why)
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError("only ASCII letters, digits, '.', '-' (and ':' in an IPv6 address) may appear")
    lowered = text.lower()
    if ":" in lowered:
        try:
            address = ipaddress.IPv6Address(lowered)
        except ValueError:
            raise ValueError("a port belongs in the port field, not in the host") from None
        if str(address) != lowered:
            raise ValueError(f"write the IPv6 address in its canonical form {address}")
        return lowered
    name = lowered.removesuffix(".")
    if len(name) > 253 or not _DNS_NAME.fullmatch(name):
        raise ValueError("not a DNS name (labels of letters, digits and '-', separated by single dots)")
    if _NUMERIC.fullmatch(name) or name.rsplit(".", 1)[-1].isdigit():
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise ValueError("an IPv4 address in a non-standard form (write a.b.c.d) or a numeric name") from None
    return name


def normal_endpoint(value: str) -> str:
    """An S3 endpoint as ``scheme://host[:port]`` in lower case, the scheme's default port left out (so
    ``https://s3.example:443`` equals ``https://s3.example``); ValueError for anything else."""
    match = _ENDPOINT.fullmatch(value.lower().removesuffix("/"))
    if match is None:
        raise ValueError("not of the form scheme://host[:port] (http or https; no user info, path or query)")
    scheme, host, port = match.group("scheme", "host", "port")
    normal_host(host.removeprefix("[").removesuffix("]"))
    shown = "" if port is None or port == _DEFAULT_PORTS[scheme] else f":{port}"
    return f"{scheme}://{host}{shown}"


def _check_host(value: str) -> str:
    if normal_host(value) != value:
        raise ValueError(f"write {normal_host(value)!r}: lower case, no trailing dot")
    return value


def _check_endpoint(value: str) -> str:
    normal_endpoint(value)
    return value


NamespaceName = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
BucketName = Annotated[str, Field(min_length=3, max_length=63, pattern=BUCKET)]
GrantedHost = Annotated[
    str,
    Field(
        description="A DNS name (lower case, no trailing dot) or an IP address in canonical form.",
        min_length=1,
        max_length=253,
        pattern=rf"^({_LABEL}(\.{_LABEL})*|[0-9a-f:.]*:[0-9a-f:.]*)$",
        json_schema_extra=cel(
            (
                "isIP(self) || !self.matches('^((0x[0-9a-f]*|[0-9]+)[.]){0,3}(0x[0-9a-f]*|[0-9]+)$')",
                "an IPv4 address in a non-standard form: write a.b.c.d",
            ),
            ("isIP(self) || !self.matches('(^|[.])[0-9]+$')", "a DNS name's last label cannot be a number"),
            ("!self.contains(':') || (isIP(self) && ip.isCanonical(self))", "an IPv6 address in canonical form"),
        ),
    ),
    AfterValidator(_check_host),
]
Endpoint = Annotated[
    str,
    Field(
        description="An S3 endpoint exactly as objects name it: scheme://host[:port], e.g. https://minio.storage:9000.",
        min_length=8,
        max_length=270,
        pattern=ENDPOINT,
    ),
    AfterValidator(_check_endpoint),
]


class S3Grant(CamelModel):
    """S3 access beyond the default (AWS, with keys from a Secret of the object's own namespace)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.ambientCredentials) || !self.ambientCredentials"
                " || (has(self.buckets) && size(self.buckets) > 0)",
                "ambientCredentials needs buckets: the operator's own credentials reach every bucket its role allows",
            ),
        )
    )

    endpoint: Endpoint | None = Field(
        None, description="A custom (S3-compatible) endpoint objects may name; AWS itself when absent."
    )
    buckets: list[BucketName] = Field(
        default_factory=list,
        description="The buckets allowed at this endpoint; every bucket when empty (not with ambientCredentials).",
        max_length=64,
    )
    ambient_credentials: bool = Field(
        False,
        description="Objects may leave out credentialsSecretRef for these buckets, so the operator and its agent "
        "pods use their own ambient credentials (IRSA, instance profile, environment).",
    )

    @model_validator(mode="after")
    def _ambient_needs_buckets(self) -> S3Grant:
        if self.ambient_credentials and not self.buckets:
            raise ValueError(
                "ambientCredentials needs buckets: the operator's own credentials reach every bucket its role allows"
            )
        return self


class HostGrant(CamelModel):
    """A database or Redis server objects may connect to, beyond the Services of their own namespace."""

    host: GrantedHost = Field(description="The host exactly as objects name it (a DNS name or an IP address).")
    port: Port = Field(description="The port.")


class RunbookGrantSpec(CamelModel):
    """What the runbook.dev objects of the listed namespaces may reach beyond their own namespace."""

    namespaces: list[NamespaceName] = Field(
        description="The tenant namespaces this grant applies to (exact names).", min_length=1, max_length=256
    )
    s3: list[S3Grant] = Field(
        default_factory=list, description="S3 endpoints, buckets and ambient credentials allowed.", max_length=32
    )
    hosts: list[HostGrant] = Field(
        default_factory=list,
        description="Database and Redis servers allowed besides the namespace's own Services (host and port, "
        "exact; the only way to allow an IP address or a Service of another namespace).",
        max_length=64,
    )
    export_namespaces: list[NamespaceName] = Field(
        default_factory=list,
        description="Namespaces a BackupPolicy may export besides its own (its ServiceAccount then reads them).",
        max_length=64,
    )
    plaintext_connections: bool = Field(
        False,
        description="Connections without TLS may be used (each still shows a Warning condition); refused otherwise.",
    )


class RunbookGrantStatus(StatusBase):
    """Observed state of a RunbookGrant (the operator only reads grants: nothing writes it yet)."""
