"""Redis ACL users for password rotation: add a password, keep only one, check a login.

Passwords are sent as SHA-256 hashes (``#<hex>``, which ACL SETUSER accepts), so the server never holds
the plaintext and ``MONITOR`` or the slow log cannot show it.
"""

from __future__ import annotations

import hashlib

import redis

from ..models.sources import RedisTLS

TIMEOUT = 10


def connect(*, host: str, port: int, tls: RedisTLS | None, ca_pem: str | None, user: str, password: str) -> redis.Redis:
    """A client logged in as ``user``; commands raise ``redis.ConnectionError`` when the server is unreachable."""
    secure = tls is not None and tls.enabled
    verify = secure and tls is not None and not tls.insecure_skip_verify
    return redis.Redis(
        host=host,
        port=port,
        username=user,
        password=password,
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
        ssl=secure,
        ssl_ca_data=ca_pem,
        ssl_cert_reqs="required" if verify else "none",
        ssl_check_hostname=verify,
    )


def _hashed(password: str) -> str:
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def user_exists(client: redis.Redis, user: str) -> bool:
    return client.acl_getuser(user) is not None


def add_password(client: redis.Redis, user: str, password: str) -> None:
    """Let ``user`` log in with this password too; its other passwords keep working."""
    client.execute_command("ACL", "SETUSER", user, _hashed(password))  # type: ignore[no-untyped-call]


def keep_only_password(client: redis.Redis, user: str, password: str) -> None:
    """Make this the only password of ``user`` (one atomic command: no moment without a password)."""
    client.execute_command("ACL", "SETUSER", user, "resetpass", _hashed(password))  # type: ignore[no-untyped-call]


def login_works(*, host: str, port: int, tls: RedisTLS | None, ca_pem: str | None, user: str, password: str) -> bool:
    """Whether this login is accepted; raises ``redis.ConnectionError`` when the server is unreachable."""
    client = connect(host=host, port=port, tls=tls, ca_pem=ca_pem, user=user, password=password)
    try:
        client.ping()
    except redis.AuthenticationError:
        return False
    finally:
        client.close()
    return True
