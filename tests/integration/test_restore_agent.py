"""The restore agent run as a process (as the BackupRestore's Job pod runs it), against a backup made by the
BackupPolicy agent, with real PostgreSQL, gpg and the S3 API server."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.restore_support import (
    OWNER,
    OWNER_PASSWORD,
    Backup,
    create_empty_database,
    create_shop,
    damage,
    database_text,
    fingerprint,
    make_backup,
    pg_source,
    plan_for,
    private_key,
    restore_env,
    run_restore_agent,
    swap_object,
    tamper,
)
from tests.services import GpgKeyring, Postgres, S3Server

from runbook_operator.agent import restore as agent_restore
from runbook_operator.models.plans import manifest_signed, sign_manifest
from runbook_operator.reconcilers.jobs import job_summary


@pytest.fixture
def shop(postgres: Postgres) -> str:
    return create_shop(postgres)


@pytest.fixture
def backup(postgres: Postgres, shop: str, s3_server: S3Server, gpg_keyring: GpgKeyring) -> Backup:
    return make_backup(postgres, shop, s3_server, gpg_keyring)


def target(postgres: Postgres, database: str) -> dict[str, Any]:
    connection: dict[str, Any] = pg_source(postgres, database)["postgresql"]
    return connection


def failure(result: Any, command: str, reason: str) -> str:
    assert result.returncode == 1, result.stdout
    line: str = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{command} failed: {reason}: "), result.stderr
    return line


def test_restore_brings_back_the_backed_up_rows(
    postgres: Postgres, shop: str, backup: Backup, s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    before = fingerprint(postgres, shop)
    assert backup.manifest["source"]["tableRowCounts"] == {"public.customers": 3000, "public.orders": 12000}
    damage(postgres, shop)
    assert fingerprint(postgres, shop) != before
    env = restore_env(plan_for(backup, target(postgres, shop)), s3_server, private_key(gpg_keyring))

    verified = run_restore_agent("verify", env)
    assert verified.returncode == 0, verified.stderr
    figures = json.loads(verified.stdout)["postgresql"]
    assert (figures["sha256"], figures["sizeBytes"]) == (
        backup.manifest["data"]["sha256"],
        backup.manifest["data"]["sizeBytes"],
    )
    assert figures["archiveEntries"] > 0
    restored = run_restore_agent("restore", env)
    assert restored.returncode == 0, restored.stderr
    assert fingerprint(postgres, shop) == before
    assert OWNER_PASSWORD not in restored.stdout + restored.stderr


def test_one_changed_byte_is_caught_and_the_database_is_untouched(
    postgres: Postgres, shop: str, backup: Backup, s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    damage(postgres, shop)
    damaged = fingerprint(postgres, shop)
    tamper(s3_server, backup.bucket, backup.manifest["data"]["key"])
    env = restore_env(plan_for(backup, target(postgres, shop)), s3_server, private_key(gpg_keyring))

    line = failure(run_restore_agent("verify", env), "verify", "ChecksumMismatch")
    assert "does not match the manifest" in line
    # Even without the preflight, the restore itself never lets a changed object through.
    failure(run_restore_agent("restore", env), "restore", "ChecksumMismatch")
    assert fingerprint(postgres, shop) == damaged


def test_a_changed_last_byte_is_caught_by_the_restore_itself(
    postgres: Postgres, shop: str, backup: Backup, s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    """The end of the object is held back until its digest matched: pg_restore never sees a whole archive."""
    damage(postgres, shop)
    damaged = fingerprint(postgres, shop)
    tamper(s3_server, backup.bucket, backup.manifest["data"]["key"], offset=backup.manifest["data"]["sizeBytes"] - 1)
    env = restore_env(plan_for(backup, target(postgres, shop)), s3_server, private_key(gpg_keyring))
    failure(run_restore_agent("restore", env), "restore", "ChecksumMismatch")
    assert fingerprint(postgres, shop) == damaged


def test_wrong_key_fails_to_decrypt(
    postgres: Postgres, shop: str, backup: Backup, s3_server: S3Server, tmp_path: Path
) -> None:
    other = GpgKeyring(tmp_path / "other", email="someone-else@example.com").start()
    env = restore_env(plan_for(backup, target(postgres, shop)), s3_server, private_key(other))
    line = failure(run_restore_agent("verify", env), "verify", "DecryptionFailed")
    assert "spec.decryptionSecretRef" in line
    assert "PRIVATE KEY" not in line


def test_restore_failing_halfway_rolls_back(
    postgres: Postgres, shop: str, backup: Backup, s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    """A view the backup does not know depends on a table: dropping it fails midway, nothing is changed."""
    damage(postgres, shop)
    with postgres.connect(shop, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute("CREATE VIEW big_orders AS SELECT * FROM orders WHERE amount > 50")
    damaged = fingerprint(postgres, shop)
    env = restore_env(plan_for(backup, target(postgres, shop)), s3_server, private_key(gpg_keyring))
    line = failure(run_restore_agent("restore", env), "restore", "RestoreFailed")
    assert "rolled back" in line and "depend" in line
    assert fingerprint(postgres, shop) == damaged


def test_unreachable_object_and_plan_errors_are_named(
    postgres: Postgres, shop: str, backup: Backup, s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    plan = plan_for(backup, target(postgres, shop))
    env = restore_env({**plan, "key": plan["key"] + ".missing"}, s3_server, private_key(gpg_keyring))
    failure(run_restore_agent("verify", env), "verify", "BackupNotFound")
    env = restore_env(plan, s3_server, private_key(gpg_keyring), RUNBOOK_RESTORE_PLAN="{not json")
    failure(run_restore_agent("restore", env), "restore", "InvalidPlan")


# --- names, roles, sequences and large objects (issue 11, items 4, 6, 7) --------------------------------

# Schema and table names with spaces, quotes, dots and non-ASCII characters, including two pairs that read
# the same once printed unquoted ("x a b" is schema "x" table "a b", and schema "x a" table "b").
ODD_TABLES = (
    ("Billing Dept", "Open Invoices", 7),
    ("odd.schema", 'we"ird.na me', 5),
    ("public", "Überweisungen ünd €", 3),
    ("x", "a b", 2),
    ("x a", "b", 1),
)


def _ident(*parts: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in parts)


def test_names_with_spaces_quotes_dots_and_non_ascii_verify_restore_and_check(
    postgres: Postgres, shop: str, s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    database = create_empty_database(postgres, "names")
    with postgres.connect(database, user=OWNER, password=OWNER_PASSWORD) as conn:
        for schema, table, rows in ODD_TABLES:
            if schema != "public":
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(schema)}")
            conn.execute(f"CREATE TABLE {_ident(schema, table)} (id int PRIMARY KEY)")
            conn.execute(f"INSERT INTO {_ident(schema, table)} SELECT generate_series(1, {rows})")
    backup = make_backup(postgres, database, s3_server, gpg_keyring)
    counts = backup.manifest["source"]["tableRowCounts"]
    assert counts['"Billing Dept"."Open Invoices"'] == 7
    assert counts['"odd.schema"."we""ird.na me"'] == 5
    assert counts['public."Überweisungen ünd €"'] == 3
    assert (counts['x."a b"'], counts['"x a".b']) == (2, 1)

    plan = plan_for(backup, target(postgres, database))
    env = restore_env(plan, s3_server, private_key(gpg_keyring))
    verified = run_restore_agent("verify", env)
    assert verified.returncode == 0, verified.stderr
    with postgres.connect(database, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute(f"DELETE FROM {_ident('Billing Dept', 'Open Invoices')}")
    restored = run_restore_agent("restore", env)
    assert restored.returncode == 0, restored.stderr
    from runbook_operator.agent.restore import check_contents
    from runbook_operator.models.plans import RestorePlan

    figures = check_contents(RestorePlan.model_validate(plan).target, env, backup.manifest["source"])
    assert figures["tables"] == len(ODD_TABLES) and figures["rows"] == 18


def test_verify_reads_older_manifests_dotted_keys(
    postgres: Postgres, shop: str, backup: Backup, s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    """A manifest written before table keys were quoted (and without table OIDs) is still verified by name."""
    plan = {**plan_for(backup, target(postgres, shop)), "tables": ["public.customers", "public.orders"]}
    plan.pop("tableOids", None)
    verified = run_restore_agent("verify", restore_env(plan, s3_server, private_key(gpg_keyring)))
    assert verified.returncode == 0, verified.stderr
    missing = {**plan, "tables": ["public.customers", "public.invoices"]}
    line = failure(
        run_restore_agent("verify", restore_env(missing, s3_server, private_key(gpg_keyring))),
        "verify",
        "ArchiveIncomplete",
    )
    assert "public.invoices" in line and "public.customers" not in line


@pytest.fixture
def fresh_server() -> Iterator[Postgres]:
    """Another PostgreSQL server, as a disaster-recovery site has: none of the source's roles exist there."""
    with Postgres() as server:
        yield server


RESTORER, RESTORER_PASSWORD = "dr_admin", "dr-admin-pw-51c2"
READER_ROLE, AUDITOR_ROLE = "clinic_readonly", "clinic_auditor"


def test_the_verify_jobs_summary_is_its_termination_message_and_the_operator_reads_it(
    postgres: Postgres,
    shop: str,
    backup: Backup,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The preflight's verify Job, in-process: its one-line summary goes to the termination log (where the
    kubelet reads it, within its 4096 bytes), and the operator's reader finds the figures in it; a refusal is
    the line the operator reads as the reason."""
    log = tmp_path / "termination-log"
    log.touch()
    monkeypatch.setattr(agent_restore, "TERMINATION_LOG", str(log))
    env = restore_env(plan_for(backup, target(postgres, shop)), s3_server, private_key(gpg_keyring))
    assert agent_restore.main("verify", source="postgresql", env=env) == 0
    message = log.read_text()
    assert len(message.encode()) < 4096
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {"message": message}}}]}}
    figures = job_summary([pod], "postgresql")
    assert figures is not None and figures["sha256"] == backup.manifest["data"]["sha256"] and figures["etag"]

    tamper(s3_server, backup.bucket, backup.manifest["data"]["key"])
    log.write_text("")
    capsys.readouterr()
    assert agent_restore.main("verify", source="postgresql", env=env) == 1
    assert log.read_text() == ""  # a refusal is the last line of the logs (FallbackToLogsOnError)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("verify failed: ChecksumMismatch: ") and "does not match the manifest" in last


def test_restore_into_a_fresh_server_without_the_roles(
    postgres: Postgres, shop: str, s3_server: S3Server, gpg_keyring: GpgKeyring, fresh_server: Postgres
) -> None:
    with postgres.connect() as conn:
        for role, attributes in ((READER_ROLE, "NOLOGIN"), (AUDITOR_ROLE, "LOGIN BYPASSRLS CREATEDB")):
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                conn.execute(f"CREATE ROLE {role} {attributes} PASSWORD 'never-copied-9d1e'")
        conn.execute(f"GRANT {READER_ROLE} TO {AUDITOR_ROLE}")
    with postgres.connect(shop, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute(f"GRANT SELECT ON orders TO {READER_ROLE}")
        conn.execute(f"GRANT SELECT (id, email) ON customers TO {AUDITOR_ROLE}")
    backup = make_backup(postgres, shop, s3_server, gpg_keyring)
    roles = {role["name"]: role for role in backup.manifest["source"]["roles"]}
    assert set(roles) == {OWNER, READER_ROLE, AUDITOR_ROLE}
    assert roles[AUDITOR_ROLE]["login"] and set(roles[AUDITOR_ROLE]["privileged"]) == {"BYPASSRLS", "CREATEDB"}
    assert roles[AUDITOR_ROLE]["memberOf"] == [READER_ROLE]
    assert "never-copied" not in json.dumps(backup.manifest)

    with fresh_server.connect() as conn:
        conn.execute(f"CREATE ROLE {RESTORER} LOGIN CREATEROLE PASSWORD '{RESTORER_PASSWORD}'")
    fresh_target = {**target(postgres, shop), "host": fresh_server.host, "port": fresh_server.port}
    login = {"PGUSER": RESTORER, "PGPASSWORD": RESTORER_PASSWORD}

    def restore_into(options: dict[str, Any] | None, owner: str = RESTORER) -> tuple[str, Any]:
        database = f"dr_{uuid.uuid4().hex[:8]}"
        with fresh_server.connect() as conn:
            conn.execute(f"CREATE DATABASE {database} OWNER {owner}")
        plan = plan_for(backup, {**fresh_target, "database": database}, options)
        return database, run_restore_agent("restore", restore_env(plan, s3_server, private_key(gpg_keyring), **login))

    # Default (owners and privileges as backed up, no roles created): refused, rolled back, nothing created.
    database, result = restore_into(None)
    line = failure(result, "restore", "RestoreFailed")
    assert "does not exist" in line and "rolled back" in line
    with fresh_server.connect(database) as conn:
        assert conn.execute("SELECT to_regclass('public.orders')").fetchone() == (None,)

    # Without owners and privileges: everything belongs to the restoring login, no grant is attempted.
    database, result = restore_into({"owners": "Skip", "privileges": "Skip"})
    assert result.returncode == 0, result.stderr
    with fresh_server.connect(database) as conn:
        assert conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'orders'").fetchone() == (RESTORER,)
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (12000,)
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'clinic_%'").fetchone() == (0,)

    # Creating the missing roles first: grants as on the source, roles without passwords or privileged
    # attributes. (Owners as on the source need the owner roles to have CREATE on the schema: the database
    # is then created for its owner, below.)
    database, result = restore_into({"owners": "Skip", "privileges": "Keep", "createMissing": True})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rolesCreated"] == sorted([OWNER, READER_ROLE, AUDITOR_ROLE])
    with fresh_server.connect(database) as conn:
        assert conn.execute(f"SELECT has_table_privilege('{READER_ROLE}', 'orders', 'SELECT')").fetchone() == (True,)
        assert conn.execute(
            f"SELECT has_column_privilege('{AUDITOR_ROLE}', 'customers', 'email', 'SELECT')"
        ).fetchone() == (True,)
        created = conn.execute(
            "SELECT rolname, rolcanlogin, rolsuper, rolbypassrls, rolcreatedb, rolcreaterole, rolreplication, "
            "rolpassword IS NULL FROM pg_authid WHERE rolname = ANY(%s) ORDER BY 1",
            ([OWNER, READER_ROLE, AUDITOR_ROLE],),
        ).fetchall()
        assert created == [
            (AUDITOR_ROLE, True, False, False, False, False, False, True),
            (READER_ROLE, False, False, False, False, False, False, True),
            (OWNER, True, False, False, False, False, False, True),
        ]
        assert conn.execute(f"SELECT pg_has_role('{AUDITOR_ROLE}', '{READER_ROLE}', 'MEMBER')").fetchone() == (True,)
    # Into a database of the backed-up owner, with the defaults: owners and grants as on the source, and the
    # roles are found, none is created.
    database, result = restore_into({"createMissing": True}, owner=OWNER)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rolesCreated"] == []
    with fresh_server.connect(database) as conn:
        assert conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'orders'").fetchone() == (OWNER,)
        assert conn.execute(f"SELECT has_table_privilege('{READER_ROLE}', 'orders', 'SELECT')").fetchone() == (True,)


def test_check_compares_sequences_and_large_objects(
    postgres: Postgres, shop: str, s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    with postgres.connect(shop, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute('CREATE SEQUENCE "invoice no" START 1000')
        conn.execute("SELECT nextval('\"invoice no\"') FROM generate_series(1, 5)")
        conn.execute("CREATE SEQUENCE unused_seq")
        oids = [
            conn.execute("SELECT lo_from_bytea(0, %s)", (data,)).fetchone()[0]  # type: ignore[index]
            for data in (b"scan-1", b"\x00" * (3 * 1024 * 1024 + 17), "röntgen".encode())
        ]
    backup = make_backup(postgres, shop, s3_server, gpg_keyring)
    source = backup.manifest["source"]
    assert source["sequences"]['public."invoice no"'] == {"lastValue": 1004, "isCalled": True}
    assert source["sequences"]["public.unused_seq"] == {"lastValue": 1, "isCalled": False}
    assert source["largeObjects"]["count"] == 3 and len(source["largeObjects"]["sha256"]) == 64

    damage(postgres, shop)
    with postgres.connect(shop, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute("SELECT nextval('\"invoice no\"')")
        conn.execute("SELECT lo_unlink(%s)", (oids[0],))
    plan = plan_for(backup, target(postgres, shop))
    env = restore_env(plan, s3_server, private_key(gpg_keyring))
    restored = run_restore_agent("restore", env)
    assert restored.returncode == 0, restored.stderr
    from runbook_operator.agent.restore import check_contents
    from runbook_operator.errors import RunbookError
    from runbook_operator.models.plans import RestorePlan

    connection = RestorePlan.model_validate(plan).target
    figures = check_contents(connection, env, source)
    assert (figures["sequences"], figures["largeObjects"]) == (2, 3)

    with postgres.connect(shop, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute("SELECT setval('\"invoice no\"', 1004, false)")
    with pytest.raises(RunbookError) as info:
        check_contents(connection, env, source)
    assert info.value.reason == "ContentMismatch" and 'public."invoice no"' in info.value.message
    with postgres.connect(shop, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute("SELECT setval('\"invoice no\"', 1004, true)")
        conn.execute("SELECT lo_put(%s, 1024 * 1024, '\\x01')", (oids[1],))
    with pytest.raises(RunbookError) as info:
        check_contents(connection, env, source)
    assert info.value.reason == "ContentMismatch" and "large objects" in info.value.message
    with postgres.connect(shop, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute("SELECT lo_unlink(%s)", (oids[2],))
    with pytest.raises(RunbookError) as info:
        check_contents(connection, env, source)
    assert "2 large objects, manifest 3" in info.value.message


# --- restore integrity (issue 13, item 5) ----------------------------------------------------------------

ATTACKER_ROW = "ATTACKER ROW"
MANIFEST_KEY = "5f0c3c0e9a7d4b8e8c1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f"
# The restore agent used to hold back the object's last MiB until the digest matched: twice that in padding
# puts the whole swapped archive before the held-back end, so holding back did not keep it from pg_restore.
PADDING = 2 * 1024 * 1024


def attacker_backup(postgres: Postgres, s3_server: S3Server, gpg_keyring: GpgKeyring) -> Backup:
    """A valid backup, made by the real agent and encrypted to the same (public) key, of a database of the same
    shape holding ``ATTACKER ROW``."""
    database = create_shop(postgres)
    with postgres.connect(database, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute("INSERT INTO customers VALUES (0, %s)", (ATTACKER_ROW,))
    return make_backup(postgres, database, s3_server, gpg_keyring)


def test_a_swapped_archive_is_never_committed(
    postgres: Postgres, shop: str, backup: Backup, s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    """A bucket writer stores a valid archive inserting ATTACKER ROW over the backup's data object, padded past
    the old held-back tail, under the manifest whose sha256 is the original's: the restore fails with
    ChecksumMismatch and the target database is exactly as it was."""
    swap_object(s3_server, backup, attacker_backup(postgres, s3_server, gpg_keyring), PADDING)
    damage(postgres, shop)
    before = database_text(postgres, shop)
    env = restore_env(plan_for(backup, target(postgres, shop)), s3_server, private_key(gpg_keyring))

    line = failure(run_restore_agent("restore", env), "restore", "ChecksumMismatch")
    assert "does not match the manifest" in line
    assert database_text(postgres, shop) == before
    with postgres.connect(shop) as conn:
        assert conn.execute("SELECT count(*) FROM customers WHERE email = %s", (ATTACKER_ROW,)).fetchone() == (0,)


def test_an_object_changed_after_the_preflight_is_not_even_read(
    postgres: Postgres, shop: str, backup: Backup, s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    """With the ETag the preflight read pinned into the plan, S3 refuses to serve a swapped object."""
    plan = plan_for(backup, target(postgres, shop))
    verified = run_restore_agent("verify", restore_env(plan, s3_server, private_key(gpg_keyring)))
    assert verified.returncode == 0, verified.stderr
    etag = json.loads(verified.stdout)["postgresql"]["etag"]
    assert etag
    swap_object(s3_server, backup, attacker_backup(postgres, s3_server, gpg_keyring), PADDING)
    damage(postgres, shop)
    before = database_text(postgres, shop)
    env = restore_env({**plan, "etag": etag}, s3_server, private_key(gpg_keyring))
    line = failure(run_restore_agent("restore", env), "restore", "ChecksumMismatch")
    assert "changed since the preflight" in line
    assert database_text(postgres, shop) == before


def test_signed_manifests_verify_and_restore(
    postgres: Postgres, shop: str, s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    signed = make_backup(postgres, shop, s3_server, gpg_keyring, RUNBOOK_MANIFEST_KEY=MANIFEST_KEY)
    assert manifest_signed(signed.manifest, MANIFEST_KEY)
    before = fingerprint(postgres, shop)
    damage(postgres, shop)
    plan = {**plan_for(signed, target(postgres, shop)), "manifest": signed.manifest}
    env = restore_env(plan, s3_server, private_key(gpg_keyring), RUNBOOK_MANIFEST_KEY=MANIFEST_KEY)
    verified = run_restore_agent("verify", env)
    assert verified.returncode == 0, verified.stderr
    # The Job reads the object the preflight verified: its ETag pinned into the plan (If-Match).
    pinned = {**plan, "etag": json.loads(verified.stdout)["postgresql"]["etag"]}
    env = restore_env(pinned, s3_server, private_key(gpg_keyring), RUNBOOK_MANIFEST_KEY=MANIFEST_KEY)
    restored = run_restore_agent("restore", env)
    assert restored.returncode == 0, restored.stderr
    assert fingerprint(postgres, shop) == before
    assert MANIFEST_KEY not in verified.stdout + verified.stderr + restored.stdout + restored.stderr


@pytest.mark.parametrize("forgery", ["unsigned", "signature kept", "other key", "plan not the manifest's"])
def test_forged_manifests_are_refused_by_verify_and_restore(
    postgres: Postgres, shop: str, s3_server: S3Server, gpg_keyring: GpgKeyring, forgery: str
) -> None:
    """A bucket writer without the key swaps the data object and rewrites the manifest's sha256 and size for
    it: without a signature, with the original signature kept, or signed with a key of its own; or the plan
    names the swapped object beside the genuine signed manifest. verify (the preflight's and a drill's) and
    restore refuse it before reading any data, and the target is untouched."""
    signed = make_backup(postgres, shop, s3_server, gpg_keyring, RUNBOOK_MANIFEST_KEY=MANIFEST_KEY)
    swapped = attacker_backup(postgres, s3_server, gpg_keyring)
    swap_object(s3_server, signed, swapped, 0)
    unsigned = {key: value for key, value in signed.manifest.items() if key != "signature"}
    forged = {
        **unsigned,
        "data": {**signed.manifest["data"], **{k: swapped.manifest["data"][k] for k in ("sha256", "sizeBytes")}},
    }
    carried = {
        "unsigned": forged,
        "signature kept": {**forged, "signature": signed.manifest["signature"]},
        "other key": {**forged, "signature": sign_manifest(forged, "a key of the bucket writer's own")},
        "plan not the manifest's": signed.manifest,
    }[forgery]
    plan = plan_for(Backup(signed.bucket, signed.spec, forged), target(postgres, shop))  # as the operator builds it
    env = restore_env(
        {**plan, "manifest": carried}, s3_server, private_key(gpg_keyring), RUNBOOK_MANIFEST_KEY=MANIFEST_KEY
    )
    damage(postgres, shop)
    before = database_text(postgres, shop)

    reason = "ManifestUnsigned" if forgery == "unsigned" else "ManifestForged"
    for command in ("verify", "restore"):
        line = failure(run_restore_agent(command, env), command, reason)
        assert "RUNBOOK_MANIFEST_KEY" in line and MANIFEST_KEY not in line
    assert database_text(postgres, shop) == before
