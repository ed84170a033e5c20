"""Small helpers shared by the test tiers (no fixtures here)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes
import yaml

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "deploy" / "samples"


def load_samples() -> dict[str, dict[str, Any]]:
    """Every sample CR keyed by file stem."""
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(SAMPLES.glob("*.yaml"))}


def with_change(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``obj`` with the dotted ``path`` set to ``value`` (``DELETE`` removes it)."""
    out = copy.deepcopy(obj)
    node: Any = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


DELETE = object()


def printed_columns(api: kubernetes.client.ApiClient, namespace: str, plural: str) -> dict[str, Any]:
    """What ``kubectl get <plural>`` prints for the first object: the server-side Table."""
    headers = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
    token = api.configuration.get_api_key_with_prefix("BearerToken")
    if token:
        headers["Authorization"] = token
    url = f"{api.configuration.host}/apis/runbook.dev/v1alpha1/namespaces/{namespace}/{plural}"
    response = json.loads(api.rest_client.request("GET", url, headers=headers).data)
    names = [c["name"] for c in response["columnDefinitions"]]
    return dict(zip(names, response["rows"][0]["cells"], strict=True))
