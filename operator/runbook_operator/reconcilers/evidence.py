"""Forensic evidence of an isolated namespace: collected, packed, gpg-encrypted, uploaded, then a custody
manifest written last (it commits the evidence). Nothing here ever deletes an uploaded object."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from kubernetes.client import ApiException

from ..builders.isolation import custody_manifest, pack_archive
from ..clients import kube, s3
from ..clients.gpg import GPG, GPGError
from ..conditions import now_rfc3339
from ..errors import RunbookError
from ..logs import REDACTOR
from ..models.isolation import EvidenceCapture, EvidenceRecord
from ..models.plans import object_key
from ..models.sources import Encryption, S3Location
from .catalog import s3_client

LOG_LIMIT_BYTES = 16 * 1024 * 1024  # per container log; evidence of a breach is rarely in the 17th MiB
LOG_TIMEOUT = 10.0  # seconds per log request: an unreachable kubelet must not hold up containment
LOG_WORKERS = 8
RETRY = 30.0
FIELD = "spec.evidence"
REPLICA_SETS = kube.Resource("apps", "v1", "replicasets", "ReplicaSet")


def _as_json(objects: Any) -> bytes:
    return json.dumps(objects, indent=1, sort_keys=True).encode()


def _read_log(api: kube.Api, namespace: str, pod: str, container: str, previous: bool) -> bytes:
    text = api.read_log(
        namespace,
        pod,
        container=container,
        limit_bytes=LOG_LIMIT_BYTES,
        previous=previous,
        timestamps=True,
        timeout=LOG_TIMEOUT,
    )
    return text.encode()


def _why(error: Exception) -> str:
    if isinstance(error, ApiException):
        body = error.body.decode(errors="replace") if isinstance(error.body, bytes) else error.body
        detail = body if isinstance(body, str) else ""
        with contextlib.suppress(ValueError, AttributeError):  # not the API's JSON Status: keep the text
            detail = json.loads(detail).get("message", detail)
        return REDACTOR.scrub(f"HTTP {error.status}: {detail or error.reason}")[:512]
    return REDACTOR.scrub(f"{type(error).__name__}: {error}")[:512]


def collect(api: kube.Api, namespace: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """Pod specs, Events, ReplicaSets, workloads, NetworkPolicies and every container's current and previous
    log, as archive files; and why each log that could not be read could not be read."""
    pods = api.list(kube.PODS, namespace)
    files = {
        "pods.json": _as_json(pods),
        "events.json": _as_json(api.list(kube.EVENTS, namespace)),
        "replicasets.json": _as_json(api.list(REPLICA_SETS, namespace)),
        "deployments.json": _as_json(api.list(kube.DEPLOYMENTS, namespace)),
        "statefulsets.json": _as_json(api.list(kube.STATEFUL_SETS, namespace)),
        "cronjobs.json": _as_json(api.list(kube.CRON_JOBS, namespace)),
        "networkpolicies.json": _as_json(api.list(kube.NETWORK_POLICIES, namespace)),
    }
    requests = [
        (str(pod["metadata"]["name"]), str(container["name"]), previous)
        for pod in pods
        for container in [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"]]
        for previous in (False, True)
    ]
    errors: dict[str, str] = {}

    def read(request: tuple[str, str, bool]) -> tuple[tuple[str, str, bool], bytes | Exception]:
        try:
            return request, _read_log(api, namespace, *request)
        except Exception as error:  # recorded per pod: one unreadable log must not lose the others
            return request, error

    with ThreadPoolExecutor(max_workers=LOG_WORKERS) as pool:
        for (pod, container, previous), result in pool.map(read, requests):
            name = f"logs/{pod}/{container}{'.previous' if previous else ''}.log"
            if isinstance(result, Exception):
                errors[name] = _why(result)
            else:
                files[name] = result
    files["log-errors.json"] = json.dumps(errors, indent=1, sort_keys=True).encode()
    return files, errors


def s3_error(location: S3Location, error: Exception) -> RunbookError:
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404"):
            return RunbookError(
                "BucketNotFound", f"{FIELD}.destination.bucket: bucket {location.bucket} not found", retry_after=RETRY
            )
        return RunbookError(
            "EvidenceStoreError", f"{FIELD}.destination: bucket {location.bucket}: {code}", retry_after=RETRY
        )
    return RunbookError("EvidenceStoreUnreachable", f"{FIELD}.destination: {type(error).__name__}", retry_after=RETRY)


def _encryptor(
    api: kube.Api, namespace: str, encryption: Encryption, gpg: GPG
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments for ``encrypt_stream`` and how the manifest describes the encryption."""
    settings = encryption.gpg
    if settings.recipients_config_map_ref is not None:
        armored = kube.config_map_value(
            api,
            namespace,
            settings.recipients_config_map_ref.name,
            settings.recipients_config_map_ref.key,
            field=f"{FIELD}.encryption.gpg.recipientsConfigMapRef",
        )
        fingerprints = gpg.import_public_keys(
            armored, field=f"{FIELD}.encryption.gpg.recipientsConfigMapRef", fingerprints=settings.fingerprints
        )
        return {"recipients": fingerprints}, {"method": "public-key", "recipients": fingerprints}
    assert settings.passphrase_secret_ref is not None  # the model guarantees exactly one
    ref = settings.passphrase_secret_ref
    passphrase = kube.secret_value(
        api, namespace, ref.name, ref.key, field=f"{FIELD}.encryption.gpg.passphraseSecretRef"
    )
    return {"passphrase": passphrase}, {"method": "symmetric", "cipher": "AES256"}


def capture(
    api: kube.Api,
    body: Mapping[str, Any],
    settings: EvidenceCapture,
    *,
    requester: str,
    on_collected: Callable[[], None],
) -> EvidenceRecord:
    """Collect, pack, encrypt and upload the namespace's evidence; write the custody manifest last.

    Everything that can fail on configuration (Secrets, keys, bucket) is checked before collecting.
    ``on_collected`` runs once the evidence is read (before the slower encryption and upload).
    """
    location, encryption = settings.destination, settings.encryption
    if location is None or encryption is None:
        missing = "destination" if location is None else "encryption"
        raise RunbookError("EvidenceNotConfigured", f"{FIELD}.{missing}: required when evidence.capture is true")
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    started = now_rfc3339()
    with GPG() as gpg:
        encrypt_args, encryption_record = _encryptor(api, namespace, encryption, gpg)
        client = s3_client(api, namespace, location, field=f"{FIELD}.destination.credentialsSecretRef")
        try:
            client.head_bucket(Bucket=location.bucket)
        except (ClientError, BotoCoreError) as error:
            raise s3_error(location, error) from None
        files, log_errors = collect(api, namespace)
        collected = now_rfc3339()
        on_collected()
        tar, digests = pack_archive(files, mtime=datetime.now(UTC).timestamp())
        stamp = collected.replace("-", "").replace(":", "")
        folder = object_key(location, namespace, body["spec"]["incidentId"], f"{name}-{stamp}")
        key = f"{folder}/evidence.tar.gpg"
        try:
            upload = s3.MultipartUpload(client, location, key)
            try:
                gpg.encrypt_stream(io.BytesIO(tar), upload.write, **encrypt_args)
                upload.complete()
            except BaseException:
                upload.abort()
                raise
            manifest = custody_manifest(
                body=body,
                requester=requester,
                archive_key=key,
                archive_sha256=upload.sha256,
                archive_size=upload.size,
                tar_sha256=hashlib.sha256(tar).hexdigest(),
                files=digests,
                encryption={**encryption_record, "gpgVersion": gpg.version},
                times={
                    "requested": body["metadata"].get("creationTimestamp", ""),
                    "collectionStarted": started,
                    "collected": collected,
                    "uploaded": now_rfc3339(),
                },
                log_errors=log_errors,
            )
            manifest_key = f"{folder}/custody.json"
            s3.put_json(client, location, manifest_key, manifest)
        except (ClientError, BotoCoreError) as error:
            raise s3_error(location, error) from None
        except GPGError as error:
            raise RunbookError("EncryptionFailed", f"{FIELD}.encryption: {error}", retry_after=RETRY) from None
    return EvidenceRecord(
        key=key, sha256=upload.sha256, manifest_key=manifest_key, files=len(digests), captured_at=now_rfc3339()
    )
