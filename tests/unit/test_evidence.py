"""Evidence capture as a stream: FakeApi for the API server, moto's S3 server and stock gpg for the rest."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import tarfile
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from kubernetes.client import ApiException

from runbook_operator.clients import kube
from runbook_operator.errors import RunbookError
from runbook_operator.models.isolation import EvidenceCapture
from runbook_operator.reconcilers import evidence
from tests.fake_api import FakeApi
from tests.services import GpgKeyring, S3Server

NAMESPACE = "shop"


def pod(name: str, *containers: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"containers": [{"name": c, "image": "busybox"} for c in containers]}}


def isolation() -> dict[str, Any]:
    return {
        "metadata": {"namespace": NAMESPACE, "name": "breach", "uid": str(uuid.uuid4())},
        "spec": {"incidentId": "INC-7", "reason": "exfiltration", "severity": "P1"},
    }


@pytest.fixture
def store(s3_server: S3Server, gpg_keyring: GpgKeyring) -> tuple[FakeApi, EvidenceCapture, str]:
    """A namespace whose S3 keys and security team's public key are in a Secret and a ConfigMap."""
    api = FakeApi()
    bucket = f"evidence-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    secret = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    api.put(kube.SECRETS, NAMESPACE, {"metadata": {"name": "s3"}, "data": _b64(secret)})
    api.put(kube.CONFIG_MAPS, NAMESPACE, {"metadata": {"name": "team"}, "data": {"team.asc": gpg_keyring.public_key}})
    settings = EvidenceCapture.model_validate(
        {
            "capture": True,
            "destination": {"bucket": bucket, "endpoint": s3_server.endpoint, "credentialsSecretRef": {"name": "s3"}},
            "encryption": {"gpg": {"recipientsConfigMapRef": {"name": "team", "key": "team.asc"}}},
        }
    )
    return api, settings, bucket


def _b64(values: dict[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}


def _archive(s3_server: S3Server, gpg_keyring: GpgKeyring, bucket: str, record: Any) -> tuple[dict[str, Any], bytes]:
    s3 = s3_server.client()
    ciphertext = s3.get_object(Bucket=bucket, Key=record.key)["Body"].read()
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=record.manifest_key)["Body"].read())
    assert hashlib.sha256(ciphertext).hexdigest() == manifest["archive"]["sha256"] == record.sha256
    assert manifest["archive"]["size"] == len(ciphertext)
    return manifest, gpg_keyring.decrypt(ciphertext)


def _tarfile_of(files: dict[str, bytes], *, mtime: int) -> bytes:
    """The oracle: the same files (sorted, mode 0444) written by the standard library's tarfile, PAX format."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), mtime, 0o444
            archive.addfile(info, io.BytesIO(files[name]))
    return buffer.getvalue()


def test_the_stream_frames_files_exactly_as_tarfile_does() -> None:
    files = {"a.json": b"[]", "logs/p/c.log": b"x" * 1000, "z": b""}
    framed = b"".join(
        chunk for name in sorted(files) for chunk in evidence.tar_member(name, len(files[name]), [files[name]], mtime=7)
    )
    assert framed + evidence.tar_end(len(framed)) == _tarfile_of(files, mtime=7)
    with pytest.raises(RuntimeError, match="3 bytes written, 4 announced"):
        list(evidence.tar_member("short", 4, [b"abc"], mtime=0))


class BinaryLogs(FakeApi):
    """Logs as bytes (not UTF-8 text), in small chunks; one pod's log breaks off after its first chunk."""

    def __init__(self, logs: dict[str, bytes], broken: str) -> None:
        super().__init__()
        self.binary, self.broken = logs, broken

    def stream_log(self, namespace: str, pod: str, **options: Any) -> Iterator[bytes]:
        data = self.binary[pod][: options["limit_bytes"]]
        for start in range(0, len(data), 1000):
            if pod == self.broken and start:
                raise ApiException(status=0, reason="Read timed out")
            yield data[start : start + 1000]


def test_capture_streams_every_log_into_the_encrypted_archive_with_its_digest(
    store: tuple[FakeApi, EvidenceCapture, str], s3_server: S3Server, gpg_keyring: GpgKeyring
) -> None:
    _, settings, bucket = store
    logs = {"api-0": b"\xff\xfe not UTF-8 \n" * 5000, "web-0": b"2026 GET /\n" * 3000, "db-0": b"x" * 5000}
    api = BinaryLogs(logs, broken="db-0")
    api.objects = store[0].objects
    for name in logs:
        api.put(kube.PODS, NAMESPACE, pod(name, "main", "sidecar"))
    collected: list[str] = []
    record = evidence.capture(
        api, isolation(), settings, requester="kubectl", on_collected=lambda: collected.append("x")
    )

    manifest, plaintext = _archive(s3_server, gpg_keyring, bucket, record)
    assert hashlib.sha256(plaintext).hexdigest() == manifest["archive"]["plaintextSha256"]
    with tarfile.open(fileobj=io.BytesIO(plaintext)) as archive:
        members = archive.getmembers()
        contents = {m.name: archive.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    assert {f["name"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in contents.items()
    }
    assert [f["name"] for f in manifest["files"]] == sorted(contents) and record.files == len(contents)
    assert {m.mode for m in members} == {0o444}
    for name in ("api-0", "web-0"):  # both runs of both containers, byte for byte
        for file in ("main.log", "main.previous.log", "sidecar.log", "sidecar.previous.log"):
            assert contents[f"logs/{name}/{file}"] == logs[name]
    broken = {f"logs/db-0/{f}" for f in ("main.log", "main.previous.log", "sidecar.log", "sidecar.previous.log")}
    assert not broken & set(contents)  # a log that broke off is not archived half
    errors = json.loads(contents["log-errors.json"])
    assert errors == manifest["logErrors"] == dict.fromkeys(sorted(broken), "HTTP 0: Read timed out")
    assert members[-1].name == "log-errors.json" and collected == ["x"]
    assert {"pods.json", "events.json", "replicasets.json", "networkpolicies.json"} <= set(contents)
    assert manifest["times"]["collectionStarted"] <= manifest["times"]["collected"] <= manifest["times"]["uploaded"]


def test_logs_read_ahead_wait_for_the_archive_but_the_next_one_never_does() -> None:
    window = evidence._Window(10)
    window.hold(1, 8)  # a later log, within the limit
    waiting = threading.Thread(target=window.hold, args=(2, 5))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # 8 + 5 > 10: waits
    window.hold(0, 100)  # the log the archive waits for: never held back
    window.archived(100)  # log 0 archived: log 1 is next, 8 held
    waiting.join(0.3)
    assert waiting.is_alive()
    window.archived(8)
    waiting.join(5)
    assert not waiting.is_alive()
    window.close()
    with pytest.raises(evidence._Abandoned):
        window.hold(5, 1)


class FailingParts:
    """A real S3 client whose second part upload is refused."""

    def __init__(self, client: Any) -> None:
        self._client, self.parts = client, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def upload_part(self, **kwargs: Any) -> Any:
        self.parts += 1
        if self.parts == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "disk full"}}, "UploadPart")
        return self._client.upload_part(**kwargs)


def test_a_refused_part_stops_reading_logs_and_leaves_nothing_in_the_bucket(
    store: tuple[FakeApi, EvidenceCapture, str], s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, settings, bucket = store
    pods = 100
    for index in range(pods):
        name = f"app-{index:03}"
        api.put(kube.PODS, NAMESPACE, pod(name, "main"))
        api.logs[(NAMESPACE, name)] = random.Random(index).randbytes(500_000).hex()  # 1 MB, 2:1 compressible
    real = evidence.s3_client
    monkeypatch.setattr(evidence, "s3_client", lambda *args, **kwargs: FailingParts(real(*args, **kwargs)))

    with pytest.raises(RunbookError) as raised:
        evidence.capture(api, isolation(), settings, requester="kubectl", on_collected=lambda: None)
    assert (raised.value.reason, raised.value.message) == (
        "EvidenceStoreError",
        f"spec.evidence.destination: bucket {bucket}: InternalError",
    )
    s3 = s3_server.client()
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # neither archive nor manifest
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")  # aborted
    reads = [c for c in api.calls if c.subresource == "log"]
    assert len(reads) < pods  # the rest was never requested (1 MB each; the second part failed)
