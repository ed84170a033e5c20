"""Where a rotated password is used: a PostgreSQL role, a Redis ACL user, or nothing but the Secret.

The rotation's steps talk to a ``Target`` only, so each kind of target is written once here (``target_for``
is the one place that looks at which of ``spec.target``'s fields is set). Every failure is a RunbookError
naming the spec field, never a value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
import redis

from ..builders import rotation as build
from ..clients import kube, postgres
from ..clients import redis as redis_client
from ..errors import RunbookError
from ..logs import REDACTOR
from ..models.common import CredentialsSecretRef
from ..models.rotation import PostgresRotationTarget, RedisRotationTarget, SecretRotationSpec
from ..models.sources import TLS_CERT_KEY, TLS_KEY_KEY, RedisTLS

UNREACHABLE_RETRY = 10.0  # first retry while a server is down; doubles per failure
MISSING_RETRY = 30.0  # a Secret, role or workload that may appear
REFUSED_RETRY = 60.0  # a refusal that needs a person (privileges, a failing verification)


@dataclass(frozen=True)
class Pending:
    """The rotation's new value, as stored in the pending Secret."""

    password: str = field(repr=False)
    username: str | None  # the dual strategy's login role


class Target(Protocol):
    """What a rotation does where the password is used. Each method is idempotent (a resumed rotation repeats
    the step in flight) and blocking."""

    @property
    def kind(self) -> str:
        """status.targetKind: postgresql, redis or secret-only."""

    def check(self) -> None:
        """Read-only: the admin login works and the role to rotate exists (before a rotation starts)."""

    def login_role(self, named: str | None) -> str | None:
        """The login role the new value is for, given the one the rotated Secret names now (dual); None: the
        target's own user."""

    def apply(self, pending: Pending) -> None:
        """The target accepts the new value; the old one keeps working where the target allows it."""

    def verify(self, pending: Pending) -> None:
        """A login with the new value works, else ``VerificationFailed``."""

    def retire(self, pending: Pending) -> None:
        """Only the new value works from now on (where the target kept the old one)."""


def target_for(api: kube.Api, namespace: str, spec: SecretRotationSpec) -> Target:
    if spec.target is not None and spec.target.postgresql is not None:
        return PostgresTarget(api, namespace, spec.target.postgresql, dual=spec.strategy == "dual")
    if spec.target is not None and spec.target.redis is not None:
        return RedisTarget(api, namespace, spec.target.redis)
    return SecretOnly()


class SecretOnly:
    """A value nothing but the Secret (and the workloads reading it) knows."""

    kind = "secret-only"

    def check(self) -> None:
        pass

    def login_role(self, named: str | None) -> str | None:
        return None

    def apply(self, pending: Pending) -> None:
        pass

    def verify(self, pending: Pending) -> None:
        pass

    def retire(self, pending: Pending) -> None:
        pass


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return REDACTOR.scrub(lines[0]) if lines else type(error).__name__


@contextmanager
def _server_errors(field: str, server: str, tls: RedisTLS | None = None, server_name: str = "") -> Iterator[None]:
    """PostgreSQL and Redis failures as RunbookErrors naming the spec field (never a value); a Redis TLS
    failure names the TLS setting to fix."""
    try:
        yield
    except redis_client.TLSFault as fault:
        raise RunbookError("TLSFailed", f"{field}.tls.{fault}", retry_after=REFUSED_RETRY) from None
    except (psycopg.OperationalError, redis.AuthenticationError) as error:
        problem = postgres.tls_problem(error) if isinstance(error, psycopg.OperationalError) else None
        if problem is not None:
            raise RunbookError("TLSFailed", f"{field}.{problem} ({server})", retry_after=REFUSED_RETRY) from None
        if isinstance(error, redis.AuthenticationError) or postgres.refused(error):
            raise RunbookError(
                "LoginRefused",
                f"{field}.adminSecretRef: {server} refused the admin login: {_one_line(error)}",
                retry_after=REFUSED_RETRY,
            ) from None
        raise RunbookError(
            "DatabaseUnavailable", f"{field}: cannot reach {server}: {_one_line(error)}", retry_after=UNREACHABLE_RETRY
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as error:
        cause = redis_client.tls_fault(error, tls, server_name=server_name)
        if cause is not None:
            raise RunbookError("TLSFailed", f"{field}.tls.{cause}", retry_after=REFUSED_RETRY) from None
        raise RunbookError(
            "DatabaseUnavailable", f"{field}: cannot reach {server}: {_one_line(error)}", retry_after=UNREACHABLE_RETRY
        ) from None
    except (psycopg.Error, redis.RedisError) as error:
        raise RunbookError(
            "TargetRefused", f"{field}: {server}: {_one_line(error)}", retry_after=REFUSED_RETRY
        ) from None


def _admin(api: kube.Api, namespace: str, ref: CredentialsSecretRef, field: str) -> tuple[str, str]:
    user = kube.secret_value(api, namespace, ref.name, ref.username_key, field=field, redact=False)
    password = kube.secret_value(api, namespace, ref.name, ref.password_key, field=field)
    return user, password


def _refused(field: str, user: str) -> RunbookError:
    return RunbookError(
        "VerificationFailed",
        f"{field}: a login as {user} with the new password was refused; it will be applied again",
        retry_after=REFUSED_RETRY,
    )


@dataclass(frozen=True)
class PostgresTarget:
    """A PostgreSQL role (single), or the two login roles of a NOLOGIN group role (dual)."""

    api: kube.Api
    namespace: str
    target: PostgresRotationTarget
    dual: bool
    kind = "postgresql"
    field = "spec.target.postgresql"

    @property
    def _server(self) -> str:
        return f"PostgreSQL {self.target.host}:{self.target.port}"

    @contextmanager
    def _admin_connection(self) -> Iterator[psycopg.Connection[Any]]:
        pg = self.target
        user, password = _admin(self.api, self.namespace, pg.admin_secret_ref, f"{self.field}.adminSecretRef")
        ca = self._ca()
        with (
            _server_errors(self.field, self._server),
            postgres.connect(
                host=pg.host,
                port=pg.port,
                database=pg.database,
                user=user,
                password=password,
                ca=ca,
                limits=postgres.OPERATOR_LIMITS,
            ) as conn,
        ):
            yield conn

    def _ca(self) -> str | None:
        """The PEM text of ``tls.caSecretRef`` (verify-full), None without TLS."""
        tls = self.target.tls
        if tls is None:
            return None
        ref, field = tls.ca_secret_ref, f"{self.field}.tls.caSecretRef"
        return kube.secret_value(self.api, self.namespace, ref.name, ref.key, field=field, redact=False)

    def _refuse_privileged(self, conn: psycopg.Connection[Any]) -> None:
        """``RoleNotRotatable`` when the role (dual: the group and each login role that exists) is the admin login
        or has, or inherits from a role with, more than its own objects' powers (``postgres.rotation_refusal``)."""
        pg = self.target
        roles = [pg.user, *build.dual_roles(pg.user)] if self.dual else [pg.user]
        for role in roles:
            why = postgres.rotation_refusal(conn, role) if postgres.role_exists(conn, role) else None
            if why is not None:
                login = "" if role == pg.user else f" (the dual strategy's login role {role})"
                raise RunbookError(
                    "RoleNotRotatable",
                    f"{self.field}.user: role {role}{login} is not rotated: {why}",
                    retry_after=REFUSED_RETRY,
                )

    def check(self) -> None:
        pg = self.target
        with self._admin_connection() as conn:
            exists = postgres.role_exists(conn, pg.user)
            if exists:
                self._refuse_privileged(conn)
        if not exists:
            raise RunbookError(
                "RoleNotFound",
                f"{self.field}.user: role {pg.user} does not exist in {pg.host}:{pg.port}",
                retry_after=MISSING_RETRY,
            )

    def login_role(self, named: str | None) -> str | None:
        return build.idle_role(self.target.user, named) if self.dual else None

    def apply(self, pending: Pending) -> None:
        with self._admin_connection() as conn:
            self._refuse_privileged(conn)  # again: a resumed rotation did not pass check(), roles may have changed
            if pending.username is not None:
                postgres.set_member_password(conn, pending.username, self.target.user, pending.password)
            else:
                postgres.set_password(conn, self.target.user, pending.password)

    def verify(self, pending: Pending) -> None:
        pg = self.target
        user = pending.username or pg.user
        with _server_errors(self.field, self._server):
            ok = postgres.login_works(
                host=pg.host, port=pg.port, database=pg.database, user=user, password=pending.password, ca=self._ca()
            )
        if not ok:
            raise _refused(self.field, user)

    def retire(self, pending: Pending) -> None:
        pass  # ALTER ROLE replaced the password; dual keeps the other role working until the next rotation


@dataclass(frozen=True)
class RedisTarget:
    """A Redis ACL user: the new password is added beside the old one, which goes once the rollouts ended."""

    api: kube.Api
    namespace: str
    target: RedisRotationTarget
    kind = "redis"
    field = "spec.target.redis"

    def _errors(self) -> AbstractContextManager[None]:
        rd = self.target
        server_name = (rd.tls.server_name if rd.tls is not None else None) or rd.host
        return _server_errors(self.field, f"Redis {rd.host}:{rd.port}", rd.tls, server_name)

    def _tls(self) -> redis_client.TLSMaterial | None:
        """The CA and the client pair from their Secrets (the key registered with the redactor)."""
        tls = self.target.tls
        if tls is None or not tls.enabled:
            return None
        field = f"{self.field}.tls"
        ca = certificate = key = None
        if tls.ca_secret_ref is not None:
            ref = tls.ca_secret_ref
            ca = kube.secret_value(
                self.api, self.namespace, ref.name, ref.key, field=f"{field}.caSecretRef", redact=False
            )
        if tls.client_certificate_secret_ref is not None:
            name, pair = tls.client_certificate_secret_ref.name, f"{field}.clientCertificateSecretRef"
            certificate = kube.secret_value(self.api, self.namespace, name, TLS_CERT_KEY, field=pair, redact=False)
            key = kube.secret_value(self.api, self.namespace, name, TLS_KEY_KEY, field=pair)
        return redis_client.TLSMaterial(ca=ca, certificate=certificate, key=key)

    @contextmanager
    def _admin_client(self) -> Iterator[redis.Redis]:
        rd = self.target
        user, password = _admin(self.api, self.namespace, rd.admin_secret_ref, f"{self.field}.adminSecretRef")
        material = self._tls()
        with self._errors():
            client = redis_client.connect(
                host=rd.host, port=rd.port, tls=rd.tls, material=material, user=user, password=password
            )
            try:
                yield client
            finally:
                client.close()

    def _refuse_privileged(self, client: redis.Redis) -> None:
        """``RoleNotRotatable`` when the user is the admin login or may administer the server (ACL DRYRUN)."""
        user = self.target.user
        admin_user = kube.secret_value(
            self.api,
            self.namespace,
            self.target.admin_secret_ref.name,
            self.target.admin_secret_ref.username_key,
            field=f"{self.field}.adminSecretRef",
            redact=False,
        )
        why = None
        if user == admin_user:
            why = "it is the admin login (adminSecretRef) itself"
        elif (command := redis_client.admin_command(client, user)) is not None:
            why = f"it may run {command} (an administrator: e.g. +@all or +@admin; grant it -@admin)"
        if why is not None:
            raise RunbookError(
                "RoleNotRotatable",
                f"{self.field}.user: ACL user {user} is not rotated: {why}",
                retry_after=REFUSED_RETRY,
            )

    def check(self) -> None:
        with self._admin_client() as client:
            exists = redis_client.user_exists(client, self.target.user)
            if exists:
                self._refuse_privileged(client)
        if not exists:
            raise RunbookError(
                "RoleNotFound",
                f"{self.field}.user: ACL user {self.target.user} does not exist",
                retry_after=MISSING_RETRY,
            )

    def login_role(self, named: str | None) -> str | None:
        return None

    def apply(self, pending: Pending) -> None:
        with self._admin_client() as client:
            self._refuse_privileged(client)  # again: a resumed rotation did not pass check()
            redis_client.add_password(client, self.target.user, pending.password)

    def verify(self, pending: Pending) -> None:
        rd = self.target
        material = self._tls()
        with self._errors():
            ok = redis_client.login_works(
                host=rd.host, port=rd.port, tls=rd.tls, material=material, user=rd.user, password=pending.password
            )
        if not ok:
            raise _refused(self.field, rd.user)

    def retire(self, pending: Pending) -> None:
        with self._admin_client() as client:
            redis_client.keep_only_password(client, self.target.user, pending.password)
