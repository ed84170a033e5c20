"""The Kubernetes API through the official client: configuration, typed API handles, Secrets."""

from __future__ import annotations

import base64
import functools

import kubernetes
from kubernetes.client import ApiClient, ApiException

from ..errors import RunbookError
from ..logs import REDACTOR


@functools.cache
def api_client() -> ApiClient:
    """One shared client: in-cluster credentials in a pod, else $KUBECONFIG or ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    for credential in (*configuration.api_key.values(), configuration.password):  # the bearer token
        REDACTOR.register(str(credential).removeprefix("Bearer ") if credential else None)
    return ApiClient(configuration)


def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


def apps() -> kubernetes.client.AppsV1Api:
    return kubernetes.client.AppsV1Api(api_client())


def batch() -> kubernetes.client.BatchV1Api:
    return kubernetes.client.BatchV1Api(api_client())


def networking() -> kubernetes.client.NetworkingV1Api:
    return kubernetes.client.NetworkingV1Api(api_client())


def autoscaling() -> kubernetes.client.AutoscalingV2Api:
    return kubernetes.client.AutoscalingV2Api(api_client())


def custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def rbac() -> kubernetes.client.RbacAuthorizationV1Api:
    return kubernetes.client.RbacAuthorizationV1Api(api_client())


def is_not_found(error: BaseException) -> bool:
    return isinstance(error, ApiException) and error.status == 404


def is_conflict(error: BaseException) -> bool:
    return isinstance(error, ApiException) and error.status == 409


def read_secret_value(namespace: str, name: str, key: str, *, field: str, redact: bool = True) -> str:
    """One value of a Secret, registered with the log redactor unless ``redact`` is False (a user name that
    would redact ordinary words, e.g. ``postgres``). ``field`` names the spec field for errors."""
    try:
        secret = core().read_namespaced_secret(name, namespace)
    except ApiException as error:
        if error.status == 404:
            raise RunbookError("SecretNotFound", f"{field}: Secret {name} not found", retry_after=30) from None
        raise RunbookError("SecretUnreadable", f"{field}: Secret {name}: HTTP {error.status}", retry_after=30) from None
    data = secret.data or {}
    if key not in data:
        raise RunbookError("SecretKeyMissing", f"{field}: Secret {name} has no key {key!r}", retry_after=30)
    value = base64.b64decode(data[key]).decode()
    if redact:
        REDACTOR.register(value)
    return value


def read_config_map_value(namespace: str, name: str, key: str, *, field: str) -> str:
    """One value of a ConfigMap. ``field`` names the spec field for errors."""
    try:
        config_map = core().read_namespaced_config_map(name, namespace)
    except ApiException as error:
        if error.status == 404:
            raise RunbookError("ConfigMapNotFound", f"{field}: ConfigMap {name} not found", retry_after=30) from None
        raise
    data = config_map.data or {}
    if key not in data:
        raise RunbookError("ConfigMapKeyMissing", f"{field}: ConfigMap {name} has no key {key!r}", retry_after=30)
    value: str = data[key]
    return value
