"""Generate CustomResourceDefinitions from the pydantic models.

Pydantic emits JSON Schema (with ``$ref``/``$defs``, ``anyOf`` null unions and titles); Kubernetes wants a
structural OpenAPI v3 schema: everything inline, ``nullable`` instead of null unions, no titles. This
module converts one to the other and adds what only a CRD has (printer columns, subresources, names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .models import GROUP, KINDS, VERSION, Kind

_DROP = {"title", "additionalProperties", "$defs", "discriminator"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve every ``$ref``, fold null unions into ``nullable`` and drop what CRDs reject."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _inline(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            merged = {**_inline(options[0], defs), **_inline(rest, defs)}
            if len(options) < len(node["anyOf"]):
                merged["nullable"] = True
            if merged.get("default", 0) is None:
                del merged["default"]
            return merged
        raise ValueError(f"unions other than X | None cannot become a structural schema: {node}")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "properties":
            out[key] = {name: _inline(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _inline(value, defs)
    if "const" in out:  # Literal with a single value
        out["enum"] = [out.pop("const")]
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("default", 0) is None:
        del out["default"]
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    schema: dict[str, Any] = _inline(raw, defs)
    return schema


def build_crd(kind: Kind) -> dict[str, Any]:
    """The CustomResourceDefinition manifest of one kind."""
    spec_schema = openapi_schema(kind.spec)
    status_schema = openapi_schema(kind.status)
    status_schema.pop("required", None)  # status starts empty
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.crd_name,
            "labels": {"app.kubernetes.io/name": "runbook-operator", "app.kubernetes.io/part-of": "runbook-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": kind.scope,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": [kind.short_name],
                **({"categories": list(kind.categories)} if kind.categories else {}),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": c.name,
                            "type": c.type,
                            "jsonPath": c.json_path,
                            **({"description": c.description} if c.description else {}),
                            **({"priority": c.priority} if c.priority else {}),
                        }
                        for c in kind.columns
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": kind.description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render(kind: Kind) -> str:
    """The YAML text of one CRD file."""
    header = "# Generated by `runbook-operator crds` from the pydantic models. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(kind), sort_keys=False, width=120)


def write_crds(output: Path) -> list[Path]:
    """Write one file per kind; return the paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in KINDS:
        path = output / f"{GROUP}_{kind.plural}.yaml"
        path.write_text(render(kind))
        paths.append(path)
    return paths
