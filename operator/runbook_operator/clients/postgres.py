"""PostgreSQL: role changes and login checks for password rotation, and what backups record and restores
compare (tables, sequences, large objects, the roles a database refers to).

Passwords never travel as SQL text: libpq computes the SCRAM-SHA-256 verifier on the client
(``PQencryptPasswordConn``) and only the verifier appears in ``ALTER ROLE``, so statement logging
(``log_statement = all``) and ``pg_stat_activity`` see a salted hash, never the password. Role records
never include a password: they are read from ``pg_roles``, whose password column is always masked.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

CONNECT_TIMEOUT = 10  # seconds, per address, for the whole start-up (TCP, TLS, authentication)
# A peer that vanished is noticed within ~30 s: data unacknowledged for 30 s, or an idle connection after 10 s
# and 3 unanswered probes 5 s apart.
NETWORK_OPTIONS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


@dataclass(frozen=True)
class SessionLimits:
    """Server-side limits of a session, in seconds: a statement, a wait for a lock, a transaction left idle."""

    statement: float
    lock: float
    idle_in_transaction: float


# The operator's sessions (rotation's role checks and ALTER ROLE: milliseconds of work). The agents' sessions have
# none: a backup counts every table's rows and keeps its snapshot's transaction open while pg_dump runs.
OPERATOR_LIMITS = SessionLimits(statement=30, lock=10, idle_in_transaction=60)


def refused(error: psycopg.OperationalError) -> bool:
    """Whether a failed connection was refused by the server (it answered) rather than unreachable.

    libpq gives no SQLSTATE for connection failures; a server's answer carries its severity, FATAL.
    """
    return "FATAL:" in str(error)


def connect(
    *,
    host: str,
    port: int,
    database: str,
    user: str,
    password: str,
    ca: str | None = None,
    limits: SessionLimits | None = None,
) -> psycopg.Connection[Any]:
    """An autocommit connection; raises ``psycopg.OperationalError`` when the server is unreachable, its
    certificate fails verification (see ``tls_problem``) or it asks for anything but SCRAM-SHA-256.

    With ``ca`` (the PEM text of ``PostgresTLS.caSecretRef``): ``sslmode=verify-full``, the server's
    certificate must chain to that CA and name ``host``; without it ``sslmode=prefer`` (encrypted only when the
    server offers TLS, the server unverified: the ``insecurePlaintext`` opt-out). Always
    ``require_auth=scram-sha-256``: a server asking for a cleartext or MD5 password gets none (libpq fails
    before answering), and ``gssencmode=disable``, as GSSAPI encryption would be used instead of TLS whatever
    sslmode says. libpq reads the CA from a file path: it is given an anonymous memory file
    (``/proc/self/fd/<n>``), closed as soon as the connection is made, so nothing is left in any directory.

    Always CONNECT_TIMEOUT and NETWORK_OPTIONS; ``limits`` are set on the session right after (``set_config``,
    not the ``options`` start-up parameter, which connection poolers such as PgBouncer refuse).
    """
    conn = _connect(host=host, port=port, database=database, user=user, password=password, ca=ca)
    if limits is not None:
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false)",
                [f"{int(seconds * 1000)}ms" for seconds in (limits.statement, limits.lock, limits.idle_in_transaction)],
            )
        except BaseException:
            conn.close()
            raise
    return conn


def connection_options(
    *,
    host: str,
    port: int,
    database: str,
    user: str,
    password: str,
    root_cert: str | None = None,
    replication: bool = False,
    application_name: str | None = None,
) -> dict[str, Any]:
    """libpq's connection options for every connection this project makes (``connect`` here, the WAL
    receiver's physical replication connection in ``agent/wal.py``): CONNECT_TIMEOUT, NETWORK_OPTIONS,
    ``require_auth=scram-sha-256``, ``gssencmode=disable``, and ``sslmode=verify-full`` against the CA file
    ``root_cert`` (a path) when given, else ``sslmode=prefer``. ``replication``: a physical replication
    connection (``replication=true``; the server ignores ``database`` then)."""
    options: dict[str, Any] = {
        **NETWORK_OPTIONS,
        "host": host,
        "port": port,
        "dbname": database,
        "user": user,
        "password": password,
        "connect_timeout": CONNECT_TIMEOUT,
        "require_auth": "scram-sha-256",
        "gssencmode": "disable",
        "sslmode": "prefer",
    }
    if root_cert is not None:
        options |= {"sslmode": "verify-full", "sslrootcert": root_cert}
    if replication:
        options["replication"] = "true"
    if application_name is not None:
        options["application_name"] = application_name
    return options


def _connect(
    *, host: str, port: int, database: str, user: str, password: str, ca: str | None
) -> psycopg.Connection[Any]:
    fd = None if ca is None else os.memfd_create("postgres-ca", os.MFD_CLOEXEC)
    try:
        if fd is not None:
            os.write(fd, str(ca).encode())
        options = connection_options(
            host=host,
            port=port,
            database=database,
            user=user,
            password=password,
            root_cert=None if fd is None else f"/proc/self/fd/{fd}",
        )
        return psycopg.connect(**options, autocommit=True)
    finally:
        if fd is not None:
            os.close(fd)


def tls_problem(error: psycopg.OperationalError) -> str | None:
    """The TLS setting a failed connection points at, as ``<field>: <sentence>`` (fields of
    ``PostgresConnection``, no value in it), or None when the failure is not about TLS."""
    text = str(error)
    if "does not match host name" in text:
        return "host: the server's certificate does not name this host"
    if "certificate verify failed" in text:
        return "tls.caSecretRef: the server's certificate is not signed by this CA"
    if "could not read root certificate" in text:
        return "tls.caSecretRef: not a PEM certificate"
    if "server does not support SSL" in text:
        return "tls: the server does not offer TLS"
    return None


def role_exists(conn: psycopg.Connection[Any], role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


# Predefined roles that read or write the server's files or run programs as its OS user: as good as SUPERUSER.
SERVER_ACCESS_ROLES = ("pg_execute_server_program", "pg_read_server_files", "pg_write_server_files")


def rotation_refusal(conn: psycopg.Connection[Any], role: str) -> str | None:
    """Why the password of ``role`` (an existing role) must not be rotated by this connection's login, or None.

    Refused: the login itself (``current_user``/``session_user``), and a role that has SUPERUSER, CREATEROLE,
    REPLICATION or BYPASSRLS, or is a member (directly or through other roles) of a role that has one of them
    or of a predefined role with access to the server's files or programs (``SERVER_ACCESS_ROLES``): a
    rotation would put a password with those powers into a namespace's Secret."""
    row = conn.execute("SELECT %s IN (current_user, session_user)", (role,)).fetchone()
    if row and row[0]:
        return "it is the admin login (adminSecretRef) itself"
    rows = conn.execute(
        "SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolreplication, r.rolbypassrls FROM pg_roles r"
        " WHERE pg_has_role(%s, r.oid, 'MEMBER') AND (r.rolsuper OR r.rolcreaterole OR r.rolreplication"
        " OR r.rolbypassrls OR r.rolname = ANY(%s)) ORDER BY r.rolname = %s DESC, 1",
        (role, list(SERVER_ACCESS_ROLES), role),
    ).fetchall()
    if not rows:
        return None
    name, *flags = rows[0]
    attributes = ("SUPERUSER", "CREATEROLE", "REPLICATION", "BYPASSRLS")
    held = ", ".join(a for a, on in zip(attributes, flags, strict=True) if on) or "access to the server's files"
    return f"it has {held}" if name == role else f"it is a member of role {name}, which has {held}"


def _verifier(conn: psycopg.Connection[Any], role: str, password: str) -> sql.Literal:
    return sql.Literal(conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode())


def set_password(conn: psycopg.Connection[Any], role: str, password: str) -> None:
    """Give an existing role this password."""
    conn.execute(
        sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(sql.Identifier(role), _verifier(conn, role, password))
    )


def set_member_password(conn: psycopg.Connection[Any], role: str, group: str, password: str) -> None:
    """Make ``role`` a login member of ``group`` with this password, creating it when missing.

    Its sessions act as the group (``SET role``), so objects it creates belong to the group and stay
    usable by the other member after the next switch. It is created with none of the attributes
    ``rotation_refusal`` refuses (the caller checks an existing one and the group with it).
    """
    with conn.transaction():
        if not role_exists(conn, role):
            conn.execute(
                sql.SQL(
                    "CREATE ROLE {} WITH LOGIN INHERIT NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS "
                    "IN ROLE {} PASSWORD {}"
                ).format(sql.Identifier(role), sql.Identifier(group), _verifier(conn, role, password))
            )
        else:
            conn.execute(
                sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                    sql.Identifier(role), _verifier(conn, role, password)
                )
            )
            member = conn.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (role, group)).fetchone()
            if not (member and member[0]):
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(role)))
        conn.execute(sql.SQL("ALTER ROLE {} SET role = {}").format(sql.Identifier(role), sql.Literal(group)))


def login_works(*, host: str, port: int, database: str, user: str, password: str, ca: str | None = None) -> bool:
    """Whether this login is accepted (``connect``'s TLS and SCRAM rules, OPERATOR_LIMITS); raises
    ``psycopg.OperationalError`` when the server is unreachable, fails TLS verification or does not offer
    SCRAM-SHA-256."""
    try:
        with connect(
            host=host, port=port, database=database, user=user, password=password, ca=ca, limits=OPERATOR_LIMITS
        ) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as error:
        if refused(error):
            return False
        raise
    return True


# --- what a backup records and a restore compares ------------------------------------------------------

_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")
_QUALIFIED = re.compile(r'((?:"(?:[^"]|"")*"|[a-z_][a-z0-9_$]*))\.((?:"(?:[^"]|"")*"|[a-z_][a-z0-9_$]*))')
_LO_CHUNK = 1024 * 1024


def _quote(part: str) -> str:
    return part if _PLAIN_NAME.fullmatch(part) else '"' + part.replace('"', '""') + '"'


def qualified_name(schema: str, name: str) -> str:
    """The key of a table or sequence: ``schema.name``, each part double-quoted (quotes doubled) unless it is a
    plain lower-case identifier, so ``public.orders`` reads as before and ``"Billing Dept"."Open Invoices"``
    or ``"a.b".c`` are unambiguous."""
    return f"{_quote(schema)}.{_quote(name)}"


def parse_qualified_name(key: str) -> tuple[str, str]:
    """``(schema, name)`` of a key made by ``qualified_name``. Keys written before names were quoted
    (``Billing Dept.Open Invoices``) are split at their first dot."""
    match = _QUALIFIED.fullmatch(key)
    if match is None:
        schema, _, name = key.partition(".")
        return schema, name
    schema, name = (p[1:-1].replace('""', '"') if p.startswith('"') else p for p in match.groups())
    return schema, name


def _relations(conn: psycopg.Connection[Any], kind: str) -> list[tuple[str, str, int]]:
    """``(schema, name, oid)`` of the user relations of one ``relkind``."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname, c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = %s AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_toast%%' ORDER BY 1, 2",
        (kind,),
    ).fetchall()
    return [(str(schema), str(name), int(oid)) for schema, name, oid in rows]


def table_oids(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Every user table's OID: pg_dump's archive lists a table's data as ``<id>; 0 <oid> TABLE DATA ...``,
    so the OID finds it whatever the name holds."""
    return {qualified_name(schema, name): oid for schema, name, oid in _relations(conn, "r")}


def table_row_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Exact rows of every user table, keyed by ``qualified_name`` (backups record them; restores compare)."""
    counts: dict[str, int] = {}
    for schema, table, _ in _relations(conn, "r"):
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))).fetchone()
        counts[qualified_name(schema, table)] = int(row[0]) if row else 0
    return counts


def sequence_values(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    """``{"lastValue", "isCalled", "increment"}`` of every sequence, keyed by ``qualified_name``. Sequences are
    not transactional: this is their state now, whatever snapshot the connection holds."""
    values: dict[str, dict[str, Any]] = {}
    for schema, name, oid in _relations(conn, "S"):
        row = conn.execute(
            sql.SQL(
                "SELECT s.last_value, s.is_called, q.seqincrement FROM {} s, pg_sequence q WHERE q.seqrelid = %s"
            ).format(sql.Identifier(schema, name)),
            (oid,),
        ).fetchone()
        if row is not None:
            values[qualified_name(schema, name)] = {
                "lastValue": int(row[0]),
                "isCalled": bool(row[1]),
                "increment": int(row[2]),
            }
    return values


def large_objects_digest(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Count of the large objects and one SHA-256 over them: of the lines ``<oid>:<digest hex>``, in OID order,
    where an object's digest is the SHA-256 of its 1 MiB chunks' SHA-256s. The server hashes the chunks, so
    only 32 bytes per MiB cross the connection and no object is held in memory whole."""
    rows = conn.execute(
        "WITH RECURSIVE chunks(loid, off, digest, len) AS ("
        " SELECT m.oid, 0::bigint, sha256(c), length(c)"
        " FROM pg_largeobject_metadata m, LATERAL lo_get(m.oid, 0, %(chunk)s) c"
        " UNION ALL"
        " SELECT k.loid, k.off + %(chunk)s, sha256(c), length(c)"
        " FROM chunks k, LATERAL lo_get(k.loid, k.off + %(chunk)s, %(chunk)s) c WHERE k.len = %(chunk)s"
        ") SELECT loid, sha256(string_agg(digest, ''::bytea ORDER BY off)) FROM chunks GROUP BY loid ORDER BY loid",
        {"chunk": _LO_CHUNK},
    )
    total = hashlib.sha256()
    count = 0
    for oid, digest in rows:
        total.update(f"{int(oid)}:{bytes(digest).hex()}\n".encode())
        count += 1
    return {"count": count, "sha256": total.hexdigest()}


# Attributes a restore never gives a role it creates: each grants more than owning or using objects
# (in the order referenced_roles reads them).
PRIVILEGED_ATTRIBUTES = ("SUPERUSER", "CREATEROLE", "CREATEDB", "REPLICATION", "BYPASSRLS")


def referenced_roles(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """The roles this database's objects refer to (owners, grantees, policies: ``pg_shdepend``), with their
    attributes and their memberships among each other. Read from ``pg_roles``: never a password."""
    rows = conn.execute(
        "WITH referenced AS (SELECT DISTINCT refobjid AS oid FROM pg_shdepend"
        " WHERE refclassid = 'pg_authid'::regclass"
        " AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database()))"
        " SELECT r.rolname, r.rolcanlogin, r.rolinherit, r.rolconnlimit,"
        " r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication, r.rolbypassrls,"
        " ARRAY(SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
        "  WHERE m.member = r.oid AND m.roleid IN (SELECT oid FROM referenced) ORDER BY 1)"
        " FROM pg_roles r WHERE r.oid IN (SELECT oid FROM referenced) ORDER BY 1"
    ).fetchall()
    roles = []
    for name, login, inherit, limit, *rest in rows:
        flags, member_of = rest[:-1], rest[-1]
        roles.append(
            {
                "name": str(name),
                "login": bool(login),
                "inherit": bool(inherit),
                "connectionLimit": int(limit),
                "privileged": [a for a, on in zip(PRIVILEGED_ATTRIBUTES, flags, strict=True) if on],
                "memberOf": [str(group) for group in member_of],
            }
        )
    return roles


def create_missing_roles(conn: psycopg.Connection[Any], roles: list[dict[str, Any]]) -> list[str]:
    """Create the recorded roles the server lacks, in one transaction; the names created.

    A created role gets the recorded LOGIN, INHERIT and CONNECTION LIMIT and nothing else: no password, none of
    ``PRIVILEGED_ATTRIBUTES``, and memberships only in other roles created here (never in an existing or a
    predefined ``pg_*`` role). Existing roles are not changed. Unless the login is a superuser it is made a
    member of each role it created, as ``ALTER ... OWNER TO`` requires to give objects to it.
    """
    with conn.transaction():
        names = [role["name"] for role in roles]
        existing = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (names,))}
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        superuser = bool(row and row[0])
        created: list[str] = []
        for role in roles:
            name = role["name"]
            if name in existing or name.startswith("pg_") or name in created:
                continue
            conn.execute(
                sql.SQL("CREATE ROLE {} WITH {} {} CONNECTION LIMIT {}").format(
                    sql.Identifier(name),
                    sql.SQL("LOGIN" if role.get("login") else "NOLOGIN"),
                    sql.SQL("INHERIT" if role.get("inherit", True) else "NOINHERIT"),
                    sql.Literal(int(role.get("connectionLimit", -1))),
                )
            )
            if not superuser:
                conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(name)))
            created.append(name)
        for role in roles:
            if role["name"] not in created:
                continue
            for group in role.get("memberOf") or []:
                if group in created and group != role["name"]:
                    conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(role["name"])))
    return sorted(created)


# --- continuous WAL archiving (BackupPolicy spec.wal): the replication login and its slot ----------------


@dataclass(frozen=True)
class ReplicationFacts:
    """What the replication login's SQL connection says about itself and the server."""

    user: str
    can_replicate: bool  # REPLICATION (or SUPERUSER), which pg_receivewal and the slot functions need
    wal_level: str
    max_wal_senders: int
    in_recovery: bool
    current_lsn: str | None  # pg_current_wal_lsn() (None on a standby)


@dataclass(frozen=True)
class Slot:
    """One row of ``pg_replication_slots``."""

    name: str
    slot_type: str  # physical or logical
    active: bool
    active_pid: int | None
    restart_lsn: str | None
    retained_bytes: int | None  # pg_current_wal_lsn() - restart_lsn: what the server keeps for the slot
    wal_status: str | None  # reserved, extended, unreserved, lost
    inactive_since: str | None  # PostgreSQL >= 17 only (RFC 3339-like text), else None


def replication_facts(conn: psycopg.Connection[Any]) -> ReplicationFacts:
    row = conn.execute(
        "SELECT current_user, r.rolreplication OR r.rolsuper, current_setting('wal_level'),"
        " current_setting('max_wal_senders')::int, pg_is_in_recovery(),"
        " CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END"
        " FROM pg_roles r WHERE r.rolname = current_user"
    ).fetchone()
    assert row is not None
    user, replicate, level, senders, recovery, lsn = row
    return ReplicationFacts(str(user), bool(replicate), str(level), int(senders), bool(recovery), lsn)


def replication_slot(conn: psycopg.Connection[Any], name: str) -> Slot | None:
    """The slot named ``name``, or None. ``inactive_since`` where the server has it (17+): read through
    ``to_jsonb`` so one query serves every version."""
    row = conn.execute(
        "SELECT s.slot_type, s.active, s.active_pid, s.restart_lsn::text,"
        " CASE WHEN s.restart_lsn IS NULL OR pg_is_in_recovery() THEN NULL"
        "  ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint END,"
        " s.wal_status, to_jsonb(s) ->> 'inactive_since'"
        " FROM pg_replication_slots s WHERE s.slot_name = %s",
        (name,),
    ).fetchone()
    if row is None:
        return None
    kind, active, pid, restart, retained, wal_status, inactive = row
    return Slot(
        name,
        str(kind),
        bool(active),
        None if pid is None else int(pid),
        restart,
        None if retained is None else int(retained),
        wal_status,
        inactive,
    )


def create_physical_slot(conn: psycopg.Connection[Any], name: str) -> bool:
    """Create the physical slot ``name`` reserving WAL from now (``immediately_reserve``); False when a slot of
    that name exists already (made meanwhile by someone else: the caller looks again)."""
    try:
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (name,))
    except psycopg.errors.DuplicateObject:
        return False
    return True


def drop_slot(conn: psycopg.Connection[Any], name: str) -> bool:
    """Drop the slot ``name`` when it exists and no receiver holds it: True when gone (or never there), False
    while it is active (the caller stops the receiver and tries again)."""
    try:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (name,)
        )
    except psycopg.errors.ObjectInUse:
        return False
    return True


def terminate_slot_receiver(conn: psycopg.Connection[Any], slot: Slot) -> bool:
    """End the WAL sender serving ``slot`` (the login may signal its own sessions); whether one was ended."""
    if slot.active_pid is None:
        return False
    row = conn.execute("SELECT pg_terminate_backend(%s)", (slot.active_pid,)).fetchone()
    return bool(row and row[0])
