"""The real services the suites rely on start and answer (a missing one fails here first)."""

from __future__ import annotations

import io

from runbook_operator.clients.gpg import GPG
from runbook_operator.clients.s3 import MultipartUpload, get_json, list_keys, make_client, put_json
from runbook_operator.models.sources import S3Location
from tests.services import GpgKeyring, Postgres, Redis, S3Server


def test_postgres_and_redis_answer(postgres: Postgres, redis_server: Redis) -> None:
    with postgres.connect() as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert redis_server.client().ping()


def test_gpg_stream_to_s3_multipart_decrypts_with_stock_gpg(s3_server: S3Server, gpg_keyring: GpgKeyring) -> None:
    location = S3Location(bucket="smoke", endpoint=s3_server.endpoint, server_side_encryption="None")
    s3_server.client().create_bucket(Bucket="smoke")
    client = make_client(location, s3_server.access_key, s3_server.secret_key)
    plaintext = bytes(range(256)) * 50_000  # 12.8 MB: several 5 MiB parts
    upload = MultipartUpload(client, location, "x/data.gpg", part_size=5 * 1024 * 1024)
    with GPG() as gpg:
        recipients = gpg.import_public_keys(gpg_keyring.public_key, field="test")
        gpg.encrypt_stream(io.BytesIO(plaintext), upload.write, recipients=recipients)
    upload.complete()
    put_json(client, location, "x/manifest.json", {"sha256": upload.sha256})
    assert sorted(list_keys(client, location, "x/")) == ["x/data.gpg", "x/manifest.json"]
    stored = client.get_object(Bucket="smoke", Key="x/data.gpg")["Body"].read()
    assert len(stored) == upload.size and get_json(client, location, "x/manifest.json")["sha256"] == upload.sha256
    assert gpg_keyring.decrypt(stored) == plaintext


def test_symmetric_aes256_decrypts_with_passphrase(gpg_keyring: GpgKeyring) -> None:
    out = bytearray()
    with GPG() as gpg:
        gpg.encrypt_stream(io.BytesIO(b"runbook"), out.extend, passphrase="correct horse battery")
    assert gpg_keyring.decrypt(bytes(out), passphrase="correct horse battery") == b"runbook"
