"""The restore agent run as a process (as the BackupRestore's Job pod runs it), against a backup made by the
BackupPolicy agent, with real PostgreSQL, gpg and the S3 API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.restore_support import (
    OWNER,
    OWNER_PASSWORD,
    Backup,
    create_shop,
    damage,
    fingerprint,
    make_backup,
    pg_source,
    plan_for,
    private_key,
    restore_env,
    run_restore_agent,
    tamper,
)
from tests.services import GpgKeyring, Postgres, S3Server


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
    assert '"verify": "complete"' in verified.stdout and '"archiveEntries"' in verified.stdout
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
