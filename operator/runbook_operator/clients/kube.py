"""The Kubernetes API through the official client: configuration and the one `Api` every reconciler uses."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import kubernetes
import urllib3
from kubernetes.client import ApiClient, ApiException

from ..errors import RunbookError
from ..logs import REDACTOR
from ..settings import connection_pool_size

REQUEST_TIMEOUT = (10.0, 60.0)  # connect, read: no call waits forever on a stalled API server
LOG_CHUNK = 64 * 1024
# Connection failures (the request never sent) are retried twice; a read that timed out is not (the server may
# have acted on it): one call takes at most 3 x 10 s + 60 s.
RETRIES = urllib3.Retry(total=2, connect=2, read=0, backoff_factor=0.2)


class _BoundedApiClient(ApiClient):  # type: ignore[misc]  # the library is untyped
    """An ``ApiClient`` whose requests without a timeout of their own get REQUEST_TIMEOUT (the library's
    default is none at all), whichever API class or ``call_api`` makes them."""

    def request(self, *args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        return super().request(*args, _request_timeout=_request_timeout or REQUEST_TIMEOUT, **kwargs)


@functools.cache
def api_client() -> ApiClient:
    """One shared client: in-cluster credentials in a pod, else $KUBECONFIG or ~/.kube/config; a connection
    pool for every worker (``connection_pool_size``), REQUEST_TIMEOUT on every request, RETRIES."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    for credential in (*configuration.api_key.values(), configuration.password):  # the bearer token
        REDACTOR.register(str(credential).removeprefix("Bearer ") if credential else None)
    configuration.connection_pool_maxsize = connection_pool_size()
    configuration.retries = RETRIES
    return _BoundedApiClient(configuration)


# --- The one way reconcilers reach the API server -------------------------------------------------------
# Objects are plain dicts (the wire form); a 404 on read/patch/delete and a 409 on create are answers, not
# errors. ``Api`` is the seam: ``KubeApi`` talks to the API server, tests/fake_api.py keeps objects in memory.

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Resource:
    """A namespaced resource type: its API group ("" for core), version, plural and kind."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        """The URL path (``namespace`` None: the type across every namespace, for a list)."""
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        where = ["namespaces", namespace] if namespace is not None else []
        parts = [root, *where, self.plural, *(p for p in (name, subresource) if p)]
        return "/".join(parts)


SECRETS = Resource("", "v1", "secrets", "Secret")
CONFIG_MAPS = Resource("", "v1", "configmaps", "ConfigMap")
SERVICES = Resource("", "v1", "services", "Service")
SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount")
PODS = Resource("", "v1", "pods", "Pod")
EVENTS = Resource("", "v1", "events", "Event")
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
STATEFUL_SETS = Resource("apps", "v1", "statefulsets", "StatefulSet")
JOBS = Resource("batch", "v1", "jobs", "Job")
CRON_JOBS = Resource("batch", "v1", "cronjobs", "CronJob")
NETWORK_POLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
HPAS = Resource("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler")
WORKLOADS = {r.kind: r for r in (DEPLOYMENTS, STATEFUL_SETS, CRON_JOBS)}


def custom_resource(plural: str, kind: str) -> Resource:
    """One of the operator's own kinds."""
    return Resource("runbook.dev", "v1alpha1", plural, kind)


def workload(kind: str) -> Resource:
    """The resource of a workload kind named in a spec (Deployment, StatefulSet, CronJob)."""
    return WORKLOADS[kind]


class Api(Protocol):
    """What reconcilers may do to the cluster. Every method is blocking: call it in the operator's executor."""

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""

    def list(self, resource: Resource, namespace: str | None, *, labels: str | None = None) -> list[dict[str, Any]]:
        """The namespace's objects of that type (None: of every namespace; ``labels``: a label selector);
        none when the server does not serve the type (a CRD that is not installed)."""

    def create(self, resource: Resource, namespace: str, body: Mapping[str, Any]) -> bool:
        """Create the object; False when one of that name exists already."""

    def apply(self, resource: Resource, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply as the operator's field manager (forcing its fields); returns the result."""

    def patch(
        self, resource: Resource, namespace: str, name: str, patch: Mapping[str, Any], *, subresource: str | None = None
    ) -> dict[str, Any] | None:
        """A JSON merge patch (of ``subresource`` if given: status, scale); None when the object is gone."""

    def delete(self, resource: Resource, namespace: str, name: str) -> bool:
        """Delete in the background (dependents follow); False when it was gone already."""

    def stream_log(
        self,
        namespace: str,
        pod: str,
        *,
        container: str,
        limit_bytes: int,
        previous: bool = False,
        timestamps: bool = False,
        timeout: float | None = None,
    ) -> Iterator[bytes]:
        """A container's log (its first ``limit_bytes``) in chunks as they arrive, the request made on the first
        ``next`` and closed with the iterator (``previous``: of its last terminated run; ``timeout``: seconds
        per read, for a kubelet that may not answer)."""


def _status(error: ApiException) -> int:
    return int(error.status or 0)


_ABSENT: Mapping[int, None] = {404: None}  # the answer of a request about an object that does not exist


class KubeApi:
    """``Api`` over the shared client: plain JSON in and out, fixed timeouts, one field manager."""

    def __init__(self, client: ApiClient | None = None, *, field_manager: str = "runbook-operator") -> None:
        self._client = client
        self.field_manager = field_manager

    @property
    def client(self) -> ApiClient:
        return self._client or api_client()

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, Any]] | None = None,
        content_type: str = "application/json",
        raw: bool = False,
        timeout: float | tuple[float, float] = REQUEST_TIMEOUT,
        answers: Mapping[int, Any] | None = None,
    ) -> Any:
        """One request; a refusal whose HTTP status is in ``answers`` returns that answer (a 404 read as "none",
        a 409 create as "exists"), any other raises ``ApiException``."""
        try:
            response = self.client.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=timeout,
            )
        except ApiException as error:
            if answers is not None and _status(error) in answers:
                return answers[_status(error)]
            raise
        data = response.data.decode()
        return data if raw else json.loads(data or "{}")

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._call("GET", resource.path(namespace, name), answers=_ABSENT)
        return found

    def list(self, resource: Resource, namespace: str | None, *, labels: str | None = None) -> list[dict[str, Any]]:
        query = [("labelSelector", labels)] if labels else []
        # a 404: a type the server does not serve (its CRD not installed), none of it
        listing = self._call("GET", resource.path(namespace), query=query, answers={404: {}})
        items: list[dict[str, Any]] = listing.get("items") or []
        for item in items:  # a list's items carry neither apiVersion nor kind
            item.setdefault("apiVersion", resource.api_version)
            item.setdefault("kind", resource.kind)
        return items

    def create(self, resource: Resource, namespace: str, body: Mapping[str, Any]) -> bool:
        query = [("fieldManager", self.field_manager)]
        created = self._call("POST", resource.path(namespace), body=dict(body), query=query, answers={409: None})
        return created is not None

    def apply(self, resource: Resource, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        document = {"apiVersion": resource.api_version, "kind": resource.kind, **body}
        query = [("fieldManager", self.field_manager), ("force", "true")]
        name = str(document["metadata"]["name"])
        applied: dict[str, Any] = self._call(
            "PATCH", resource.path(namespace, name), body=document, query=query, content_type=APPLY_PATCH
        )
        return applied

    def patch(
        self, resource: Resource, namespace: str, name: str, patch: Mapping[str, Any], *, subresource: str | None = None
    ) -> dict[str, Any] | None:
        patched: dict[str, Any] | None = self._call(
            "PATCH",
            resource.path(namespace, name, subresource),
            body=dict(patch),
            query=[("fieldManager", self.field_manager)],
            content_type=MERGE_PATCH,
            answers=_ABSENT,
        )
        return patched

    def delete(self, resource: Resource, namespace: str, name: str) -> bool:
        deleted = self._call(
            "DELETE", resource.path(namespace, name), body={"propagationPolicy": "Background"}, answers=_ABSENT
        )
        return deleted is not None

    def stream_log(
        self,
        namespace: str,
        pod: str,
        *,
        container: str,
        limit_bytes: int,
        previous: bool = False,
        timestamps: bool = False,
        timeout: float | None = None,
    ) -> Iterator[bytes]:
        query: list[tuple[str, Any]] = [("container", container), ("limitBytes", limit_bytes)]
        query += [(flag, "true") for flag, wanted in (("previous", previous), ("timestamps", timestamps)) if wanted]
        response = self.client.call_api(
            PODS.path(namespace, pod, "log"),
            "GET",
            query_params=query,
            header_params={"Accept": "application/json"},  # the endpoint refuses text/plain (and sends text)
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
            _request_timeout=timeout or REQUEST_TIMEOUT,
        )
        try:
            yield from response.stream(LOG_CHUNK)
        finally:  # a log read to its end has given its connection back already; one left early is closed
            response.close()
            response.release_conn()


def secret_value(api: Api, namespace: str, name: str, key: str, *, field: str, redact: bool = True) -> str:
    """One value of a Secret, registered with the log redactor unless ``redact`` is False (a user name that
    would redact ordinary words, e.g. ``postgres``). ``field`` names the spec field for errors."""
    secret = api.get(SECRETS, namespace, name)
    if secret is None:
        raise RunbookError("SecretNotFound", f"{field}: Secret {name} not found", retry_after=30)
    data = secret.get("data") or {}
    if key not in data:
        raise RunbookError("SecretKeyMissing", f"{field}: Secret {name} has no key {key!r}", retry_after=30)
    value = base64.b64decode(data[key]).decode()
    if redact:
        REDACTOR.register(value)
    return value


def config_map_value(api: Api, namespace: str, name: str, key: str, *, field: str) -> str:
    """One value of a ConfigMap. ``field`` names the spec field for errors."""
    config_map = api.get(CONFIG_MAPS, namespace, name)
    if config_map is None:
        raise RunbookError("ConfigMapNotFound", f"{field}: ConfigMap {name} not found", retry_after=30)
    data = config_map.get("data") or {}
    if key not in data:
        raise RunbookError("ConfigMapKeyMissing", f"{field}: ConfigMap {name} has no key {key!r}", retry_after=30)
    return str(data[key])


def server_status(error: ApiException) -> tuple[str, str]:
    """An API server refusal as (reason, message): its Status object's ``reason`` and one-line ``message`` (which
    names the verb, resource, namespace and user), else the HTTP reason and the body's text (a kubelet answers a
    log request in plain text), else the HTTP reason alone. The one reader of an ``ApiException``'s body."""
    reason = str(error.reason or error.status)
    body = error.body.decode(errors="replace") if isinstance(error.body, bytes) else error.body
    text = body.strip() if isinstance(body, str) else ""
    try:
        status = json.loads(text)
    except ValueError:
        return reason, text[:1024] or reason
    if not isinstance(status, dict):
        return reason, text[:1024] or reason
    return str(status.get("reason") or reason), str(status.get("message") or reason)


def server_message(error: ApiException) -> str:
    """The API server's message of a refusal (``server_status``)."""
    return server_status(error)[1]


# --- One call on the event loop: the containment fast path's create ----------------------------------------------
AUTH_REFRESH = 30.0  # seconds an auth header is used before it is read again (the client refreshes tokens itself)
# Seconds an idle connection is kept: just under the API server's own 90 s (k8s.io/apiserver secure_serving.go), so
# that a burst finds the last one's connections open and the client, not the server, ends an idle one.
KEEPALIVE = 85.0
# Connections at most. A new one costs a TLS handshake on the event loop (about 4 ms of CPU here, against 0.4 ms
# for a request on an open one): 32 bound that cost for a burst after a long idle, and are as many requests as
# the API server of a small control plane serves at once anyway.
LOOP_CONNECTIONS = 32
WATCH_GRACE = 30.0  # seconds a watch may take beyond its server-side timeout before the client ends it


class LoopCreate:
    """``Api.create`` as a coroutine on the event loop (aiohttp), for the one call that must not wait for a thread:
    an EmergencyIsolation's first NetworkPolicy. The same server, TLS and credentials as ``api_client()`` (read
    once, in ``blocking``), connections kept alive between bursts, REQUEST_TIMEOUT and the connection retries of
    RETRIES; the body is sent as given (already JSON). A 409 is False; any other refusal an ``ApiException`` as
    the official client raises it. Also ``list`` and ``watch`` (the containment watch of EmergencyIsolations,
    reconcilers/containment.py), on connections of their own."""

    def __init__(self, client: ApiClient, *, field_manager: str = "runbook-operator") -> None:
        configuration = client.configuration
        self.host = str(configuration.host).rstrip("/")
        self.field_manager = field_manager
        self.server_hostname = configuration.tls_server_name or None
        self._configuration = configuration
        self._ssl = self._ssl_context(configuration) if self.host.startswith("https:") else False
        self._auth: dict[str, str] = {}
        self._auth_at = -AUTH_REFRESH
        self._refreshing: asyncio.Future[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None

    @staticmethod
    def _ssl_context(configuration: Any) -> ssl.SSLContext:
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        else:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if configuration.assert_hostname is False:
            context.check_hostname = False
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        return context

    def read_auth(self) -> None:
        """The auth header as the official client sends it now (its refresh hook may read a token file):
        blocking, in an executor."""
        self._auth = {
            str(setting["key"]): str(setting["value"])
            for setting in self._configuration.auth_settings().values()
            if setting.get("in") == "header" and setting.get("value")
        }
        self._auth_at = time.monotonic()

    def _fresh_auth(self, executor: Executor) -> asyncio.Future[None] | None:
        """None while the header is fresh; else a refresh under way (one at a time, ``read_auth`` in
        ``executor``), to wait for only before the first call: later calls go on with the header they have (a
        token stays valid well past the client's refresh of it)."""
        if time.monotonic() - self._auth_at >= AUTH_REFRESH and self._refreshing is None:
            refreshing = asyncio.get_running_loop().run_in_executor(executor, self.read_auth)
            refreshing.add_done_callback(lambda _: setattr(self, "_refreshing", None))
            self._refreshing = refreshing
        return self._refreshing if self._auth_at < 0 else None

    def _connection_pool(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=LOOP_CONNECTIONS, keepalive_timeout=KEEPALIVE)
            self._session = aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",))
        return self._session

    async def _headers(self, executor: Executor) -> dict[str, str]:
        waiting = self._fresh_auth(executor)
        if waiting is not None:
            await waiting
        return {"Accept": "application/json", **self._auth}

    async def create(
        self,
        resource: Resource,
        namespace: str,
        payload: bytes,
        *,
        executor: Executor,
    ) -> bool:
        """POST ``payload`` (the object as JSON); ``executor`` runs ``read_auth`` when the header is due."""
        headers = {**await self._headers(executor), "Content-Type": "application/json"}
        connect, read = REQUEST_TIMEOUT
        timeout = aiohttp.ClientTimeout(connect=connect, sock_connect=connect, sock_read=read)
        url = f"{self.host}{resource.path(namespace)}"
        params = {"fieldManager": self.field_manager}
        for attempt in range(1 + int(RETRIES.connect or 0)):
            try:
                async with self._connection_pool().post(
                    url,
                    params=params,
                    data=payload,
                    headers=headers,
                    ssl=self._ssl,
                    server_hostname=self.server_hostname,
                    timeout=timeout,
                ) as response:
                    answer = await response.read()
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError):
                if attempt >= int(RETRIES.connect or 0):  # the request was never answered: retried like RETRIES
                    raise
                await asyncio.sleep(float(RETRIES.backoff_factor) * 2**attempt)
                continue
            if response.status == 409:
                return False
            if response.status >= 300:
                raise _refusal(response.status, response.reason, answer)
            return True
        raise AssertionError("unreachable")

    async def list(self, resource: Resource, namespace: str | None, *, executor: Executor) -> dict[str, Any]:
        """A LIST (``namespace`` None: every namespace) as the API server answers it (``items``, and
        ``metadata.resourceVersion`` to watch from); REQUEST_TIMEOUT as a whole; a refusal an ``ApiException``."""
        headers = await self._headers(executor)
        connect, read = REQUEST_TIMEOUT
        timeout = aiohttp.ClientTimeout(total=connect + read, connect=connect, sock_connect=connect, sock_read=read)
        async with self._get(resource, namespace, headers=headers, timeout=timeout) as response:
            answer = await response.read()
        if response.status >= 300:
            raise _refusal(response.status, response.reason, answer)
        listed: dict[str, Any] = json.loads(answer)
        return listed

    async def watch(
        self, resource: Resource, namespace: str | None, *, version: str, seconds: int, executor: Executor
    ) -> AsyncIterator[dict[str, Any]]:
        """A watch from ``version`` (bookmarks on): its events as the API server sends them, until it ends the
        watch after ``seconds``. Deadline: ``seconds`` + WATCH_GRACE in all, so a server that stops answering
        costs a reconnect, never a watch that hangs. A refusal (410 Gone for a version too old) an
        ``ApiException``; ERROR events are passed on as they come (``type`` ERROR, ``object`` a Status)."""
        headers = await self._headers(executor)
        connect = REQUEST_TIMEOUT[0]
        timeout = aiohttp.ClientTimeout(total=seconds + WATCH_GRACE, connect=connect, sock_connect=connect)
        params = {
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }
        async with self._get(resource, namespace, headers=headers, timeout=timeout, params=params) as response:
            if response.status >= 300:
                raise _refusal(response.status, response.reason, await response.read())
            pending = b""  # one JSON object per line; a line may come in several chunks (and be longer than 64 KiB)
            async for chunk in response.content.iter_any():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        event: dict[str, Any] = json.loads(line)
                        yield event

    def _get(
        self,
        resource: Resource,
        namespace: str | None,
        *,
        headers: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """A GET of ``resource`` (the list or watch) on the lists' and watches' connections."""
        return self._watch_pool().get(
            f"{self.host}{resource.path(namespace)}",
            params=params,
            headers=headers,
            ssl=self._ssl,
            server_hostname=self.server_hostname,
            timeout=timeout,
        )

    def _watch_pool(self) -> aiohttp.ClientSession:
        """Connections of the lists and watches, apart from the creates': a watch holds its connection for
        minutes, and one per namespace must never leave a burst of creates without one."""
        if self._watch_session is None or self._watch_session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE)
            self._watch_session = aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",))
        return self._watch_session

    async def close(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()


def _refusal(status: int, reason: str | None, answer: bytes) -> ApiException:
    """A refusal as the official client raises it."""
    error = ApiException(status=status, reason=reason)
    error.body = answer.decode(errors="replace")
    return error
