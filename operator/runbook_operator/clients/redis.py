"""Redis connections (the one way every part of the operator and its agents reaches a Redis), and ACL users
for password rotation: add a password, keep only one, check a login.

TLS is built here once per client, from PEM texts: the operator reads them from Secrets, the agent from the
Secret volumes mounted in its pod. Python's ``ssl`` loads a client certificate and key only from a file
path; rather than writing the private key to a temporary file (a name in some directory, readable by any
process of the same user, left behind by a crash), the pair goes into an anonymous memory file
(``memfd_create``: no name in any file system, never on disk), which OpenSSL reads through
``/proc/self/fd`` and which is closed before the first connection is made. The key then lives only inside
the process's SSL context.

Passwords are sent as SHA-256 hashes (``#<hex>``, which ACL SETUSER accepts), so the server never holds
the plaintext and ``MONITOR`` or the slow log cannot show it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import redis
import redis.connection
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from ..logs import REDACTOR
from ..models import sources
from ..models.sources import RedisCommands, RedisTLS

TIMEOUT = 10  # seconds: to connect (TCP and TLS handshake), and for each answer
# redis-py retries a command 10 times by default; once here, so a command that gets no answer takes at most
# 2 x (10 s + 10 s) + 1 s.
RETRY = Retry(ExponentialWithJitterBackoff(base=0.1, cap=1.0), retries=1)
TLS_CERT_KEY, TLS_KEY_KEY = sources.TLS_CERT_KEY, sources.TLS_KEY_KEY  # the kubernetes.io/tls Secret's keys


@dataclass(frozen=True, repr=False)
class TLSMaterial:
    """PEM texts for one connection: the CA that signs the server, the client certificate and its key."""

    ca: str | None = None
    certificate: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        REDACTOR.register(self.key)


class TLSFault(Exception):
    """A TLS failure attributed to the setting that must change: ``setting`` is a field of ``RedisTLS``
    (camelCase, as in the spec), ``detail`` a sentence without any value."""

    def __init__(self, setting: str, detail: str) -> None:
        super().__init__(f"{setting}: {detail}")
        self.setting, self.detail = setting, detail


def _load_client_pair(context: ssl.SSLContext, certificate: str, key: str) -> None:
    fd = os.memfd_create("redis-client-pair", os.MFD_CLOEXEC)
    try:
        os.write(fd, f"{certificate.strip()}\n{key.strip()}\n".encode())
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as error:
        reason = error.reason or "unreadable"
        raise TLSFault(
            "clientCertificateSecretRef", f"tls.crt and tls.key are not a certificate and its key ({reason})"
        ) from None
    finally:
        os.close(fd)


def tls_context(tls: RedisTLS, material: TLSMaterial) -> ssl.SSLContext:
    """The client's SSL context: verify the server against the CA (the system's when none is given) and its
    name, present the client pair when there is one."""
    if tls.insecure_skip_verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cadata=material.ca) if material.ca else ssl.create_default_context()
        except ssl.SSLError as error:
            raise TLSFault("caSecretRef", f"not a PEM certificate ({error.reason or 'unreadable'})") from None
    if material.certificate is not None and material.key is not None:
        _load_client_pair(context, material.certificate, material.key)
    return context


class _TLSConnection(redis.connection.Connection):
    """A connection wrapped in our SSL context, sending ``server_name`` as SNI and checking it against the
    server's certificate (redis-py's own SSL connection always uses the host for both)."""

    def __init__(self, *, tls_context: ssl.SSLContext, server_name: str, **kwargs: Any) -> None:
        self._tls_context, self._server_name = tls_context, server_name
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    def _connect(self) -> socket.socket:
        sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]
        try:
            return self._tls_context.wrap_socket(sock, server_hostname=self._server_name)
        except BaseException:
            sock.close()
            raise


def connect(
    *,
    host: str,
    port: int,
    tls: RedisTLS | None,
    material: TLSMaterial | None,
    user: str,
    password: str,
    commands: RedisCommands | None = None,
) -> redis.Redis:
    """A client logged in as ``user`` (lazily: the first command connects, and raises
    ``redis.ConnectionError`` when the server is unreachable or refuses TLS; see ``tls_fault``). Raises
    ``TLSFault`` when the TLS material itself is unusable. Renamed ``commands`` are parsed as the originals."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "username": user,
        "password": password,
        "socket_timeout": TIMEOUT,
        "socket_connect_timeout": TIMEOUT,
        "retry": RETRY,
    }
    if tls is not None and tls.enabled:
        context = tls_context(tls, material or TLSMaterial())
        pool = redis.ConnectionPool(
            connection_class=_TLSConnection, tls_context=context, server_name=tls.server_name or host, **options
        )
        client = redis.Redis.from_pool(pool)
    else:
        client = redis.Redis(**options)
    if commands is not None:
        for original, name in (("BGSAVE", commands.bgsave), ("LASTSAVE", commands.lastsave), ("INFO", commands.info)):
            client.set_response_callback(name, client.response_callbacks[original])
    return client


def tls_fault(error: BaseException, tls: RedisTLS | None, *, server_name: str) -> TLSFault | None:
    """The TLS setting a connection failure points at, or None when it is not a TLS failure."""
    if tls is None or not tls.enabled:
        return None
    text = f"{error} {error.__context__ or ''}"
    upper = text.upper()
    if "CERTIFICATE_VERIFY_FAILED" in upper:
        if "MISMATCH" in upper or "NOT VALID FOR" in upper:
            return TLSFault("serverName", f"the server's certificate is not valid for {server_name}")
        if tls.ca_secret_ref is None:
            return TLSFault("caSecretRef", "the server's certificate is not signed by a system CA: set the CA")
        return TLSFault("caSecretRef", "the server's certificate is not signed by this CA")
    if "CERTIFICATE_REQUIRED" in upper or ("HANDSHAKE_FAILURE" in upper and tls.client_certificate_secret_ref is None):
        return TLSFault("clientCertificateSecretRef", "the server requires a client certificate")
    if any(alert in upper for alert in ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_UNKNOWN")):
        return TLSFault("clientCertificateSecretRef", "the server refused the client certificate")
    closed = ("EOF OCCURRED IN VIOLATION", "UNEXPECTED_EOF", "CONNECTION RESET BY PEER", "CONNECTION CLOSED BY SERVER")
    if tls.client_certificate_secret_ref is None and any(sign in upper for sign in closed):
        # TLS 1.3: the server checks for a client certificate after the client's handshake is done, so a
        # command written at once may meet the closed connection before the client reads the server's alert.
        return TLSFault(
            "clientCertificateSecretRef",
            "the server requires a client certificate (it closed the TLS connection when none was sent)",
        )
    if "WRONG_VERSION_NUMBER" in upper or "RECORD_LAYER_FAILURE" in upper:
        return TLSFault("enabled", "the server does not speak TLS on this port")
    return None


def _hashed(password: str) -> str:
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def user_exists(client: redis.Redis, user: str) -> bool:
    return client.acl_getuser(user) is not None


# Commands that administer the server (other users' passwords, its configuration, code it loads), as
# ACL DRYRUN tries them: a user allowed one of them (e.g. +@all, +@admin, allcommands) is an administrator.
ADMIN_COMMANDS = (("ACL", "SETUSER", "x"), ("CONFIG", "SET", "x", "y"), ("MODULE", "LOAD", "x"))


def admin_command(client: redis.Redis, user: str) -> str | None:
    """The first of ``ADMIN_COMMANDS`` that ``user`` may run (``acl setuser``), or None (ACL DRYRUN, Redis 7)."""
    for command in ADMIN_COMMANDS:
        answer = client.execute_command("ACL", "DRYRUN", user, *command)  # type: ignore[no-untyped-call]
        if answer in (b"OK", "OK"):
            return f"{command[0]} {command[1]}".lower()
    return None


def add_password(client: redis.Redis, user: str, password: str) -> None:
    """Let ``user`` log in with this password too; its other passwords keep working."""
    client.execute_command("ACL", "SETUSER", user, _hashed(password))  # type: ignore[no-untyped-call]


def keep_only_password(client: redis.Redis, user: str, password: str) -> None:
    """Make this the only password of ``user`` (one atomic command: no moment without a password)."""
    client.execute_command("ACL", "SETUSER", user, "resetpass", _hashed(password))  # type: ignore[no-untyped-call]


def login_works(
    *, host: str, port: int, tls: RedisTLS | None, material: TLSMaterial | None, user: str, password: str
) -> bool:
    """Whether this login is accepted; raises ``redis.ConnectionError`` when the server is unreachable."""
    client = connect(host=host, port=port, tls=tls, material=material, user=user, password=password)
    try:
        client.ping()
    except redis.AuthenticationError:
        return False
    finally:
        client.close()
    return True
