"""PostgreSQL for password rotation: role changes and login checks.

Passwords never travel as SQL text: libpq computes the SCRAM-SHA-256 verifier on the client
(``PQencryptPasswordConn``) and only the verifier appears in ``ALTER ROLE``, so statement logging
(``log_statement = all``) and ``pg_stat_activity`` see a salted hash, never the password.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

CONNECT_TIMEOUT = 10


def refused(error: psycopg.OperationalError) -> bool:
    """Whether a failed connection was refused by the server (it answered) rather than unreachable.

    libpq gives no SQLSTATE for connection failures; a server's answer carries its severity, FATAL.
    """
    return "FATAL:" in str(error)


def connect(*, host: str, port: int, database: str, user: str, password: str) -> psycopg.Connection[Any]:
    """An autocommit connection; raises ``psycopg.OperationalError`` when the server is unreachable."""
    return psycopg.connect(
        host=host,
        port=port,
        dbname=database,
        user=user,
        password=password,
        connect_timeout=CONNECT_TIMEOUT,
        autocommit=True,
    )


def role_exists(conn: psycopg.Connection[Any], role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


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
    usable by the other member after the next switch.
    """
    with conn.transaction():
        if not role_exists(conn, role):
            conn.execute(
                sql.SQL("CREATE ROLE {} WITH LOGIN INHERIT IN ROLE {} PASSWORD {}").format(
                    sql.Identifier(role), sql.Identifier(group), _verifier(conn, role, password)
                )
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


def login_works(*, host: str, port: int, database: str, user: str, password: str) -> bool:
    """Whether this login is accepted; raises ``psycopg.OperationalError`` when the server is unreachable."""
    try:
        with connect(host=host, port=port, database=database, user=user, password=password) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as error:
        if refused(error):
            return False
        raise
    return True


def table_row_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Exact rows of every user table, as ``{"schema.table": rows}`` (backups record them; restores compare)."""
    tables = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1, 2"
    ).fetchall()
    counts: dict[str, int] = {}
    for schema, table in tables:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))).fetchone()
        counts[f"{schema}.{table}"] = int(row[0]) if row else 0
    return counts
