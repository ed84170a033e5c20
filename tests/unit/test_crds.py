"""The committed CRDs are what the models generate, they are structural, and the samples validate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from runbook_operator.crdgen import render, write_crds
from runbook_operator.models import GROUP, KINDS, KINDS_BY_NAME
from tests.helpers import ROOT, load_samples, with_change

CRDS = ROOT / "crds"
FORBIDDEN = {"$ref", "$defs", "title", "anyOf", "oneOf", "allOf", "const", "discriminator"}


def committed(kind: str) -> dict[str, Any]:
    path = CRDS / f"{GROUP}_{KINDS_BY_NAME[kind].plural}.yaml"
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def schema_of(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = committed(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_committed_crd_matches_generated(kind: Any) -> None:
    path = CRDS / f"{GROUP}_{kind.plural}.yaml"
    assert path.read_text() == render(kind), f"{path} is stale: run `make crds`"


def test_crds_command_writes_one_file_per_kind(tmp_path: Path) -> None:
    paths = write_crds(tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{GROUP}_{k.plural}.yaml" for k in KINDS)
    assert sorted(p.name for p in CRDS.glob(f"{GROUP}_*.yaml")) == sorted(p.name for p in paths)


def _walk(node: Any, path: str, problems: list[str]) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _walk(item, f"{path}[{i}]", problems)
        return
    if not isinstance(node, dict):
        return
    for key in FORBIDDEN & node.keys():
        problems.append(f"{path}: forbidden keyword {key}")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: untyped node")
    if "description" not in node and path.count(".") > 1 and not path.endswith(("items", "additionalProperties")):
        problems.append(f"{path}: no description (kubectl explain would be empty)")
    for name, sub in node.get("properties", {}).items():
        _walk(sub, f"{path}.{name}", problems)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _walk(node[key], f"{path}.{key}", problems)


@pytest.mark.parametrize("kind", [k.kind for k in KINDS])
def test_schema_is_structural(kind: str) -> None:
    problems: list[str] = []
    schema = schema_of(kind)
    for part in ("spec", "status"):
        _walk(schema["properties"][part], f"{kind}.{part}", problems)
    assert problems == []


@pytest.mark.parametrize("kind", [k.kind for k in KINDS])
def test_crd_shape(kind: str) -> None:
    crd = committed(kind)
    names = crd["spec"]["names"]
    version = crd["spec"]["versions"][0]
    # RunbookGrant (cluster-scoped, administrators only) stays out of `kubectl get runbook`, which tenants run
    categories = [] if KINDS_BY_NAME[kind].scope == "Cluster" else ["runbook"]
    assert names["shortNames"] == [KINDS_BY_NAME[kind].short_name] and names.get("categories", []) == categories
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[-1] == "Age" and len(columns) >= 4
    status = schema_of(kind)["properties"]["status"]["properties"]
    assert {"observedGeneration", "conditions", "phase"} <= status.keys()
    condition = status["conditions"]["items"]["properties"]
    assert {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"} <= condition.keys()


def test_cross_field_rules_are_cel() -> None:
    rules = yaml.safe_dump([committed(k.kind) for k in KINDS])
    for message in (
        "set exactly one of postgresql, redis, kubernetes",
        "minReplicas must not exceed maxReplicas",
        "set at most one of schedule and interval",
        "set exactly one of recipientsConfigMapRef and passphraseSecretRef",
    ):
        assert message in rules


SAMPLES = load_samples()


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_validates_against_crd_schema(name: str) -> None:
    obj = SAMPLES[name]
    jsonschema.validate(obj, schema_of(obj["kind"]))


@pytest.mark.parametrize(
    ("name", "path", "value"),
    [
        ("backuppolicy-postgresql", "spec.retention.maxAge", "7x"),
        ("scalingprofile", "spec.autoscaling.cpuUtilization", -1),
        ("emergencyisolation", "spec.severity", "P9"),
        ("secretrotation", "spec.generator.length", 4),
    ],
)
def test_crd_schema_rejects_bad_values(name: str, path: str, value: Any) -> None:
    obj = with_change(SAMPLES[name], path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, schema_of(obj["kind"]))
