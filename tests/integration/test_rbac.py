"""The shipped ClusterRole against the real API server's discovery: every rule names real resources."""

from __future__ import annotations

import kubernetes
import pytest
import yaml
from tests.helpers import ROOT

pytestmark = pytest.mark.integration

OPTIONAL_GROUPS = {"autoscaling.k8s.io"}  # the VerticalPodAutoscaler CRD, used only when it is installed


def served(api: kubernetes.client.ApiClient) -> set[tuple[str, str]]:
    """Every (group, resource) the API server serves, subresources included (``pods/log``)."""
    pairs = {("", r.name) for r in kubernetes.client.CoreV1Api(api).get_api_resources().resources}
    for group in kubernetes.client.ApisApi(api).get_api_versions().groups:
        version = group.preferred_version.group_version
        listed = api.call_api(
            f"/apis/{version}",
            "GET",
            auth_settings=["BearerToken"],
            response_types_map={200: "object"},
            _return_http_data_only=True,
        )
        pairs |= {(group.name, r["name"]) for r in listed["resources"]}
    return pairs


def test_every_rule_of_the_shipped_role_names_resources_that_exist(
    api: kubernetes.client.ApiClient, crds_installed: list[str]
) -> None:
    role = next(
        d for d in yaml.safe_load_all((ROOT / "deploy/base/rbac.yaml").read_text()) if d["kind"] == "ClusterRole"
    )
    known = served(api)
    meaningless = [
        (group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        if group not in OPTIONAL_GROUPS and (group, resource) not in known
    ]
    assert meaningless == []
