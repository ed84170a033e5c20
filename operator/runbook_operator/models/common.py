"""Types shared by every kind: the camelCase base model, references, and validated scalars.

The pydantic models are the single source of truth for the CRDs (see ``crdgen``): every constraint that
JSON schema can express is declared here so the API server enforces it too; what it cannot express
(cron syntax, IANA zones) is validated again by the operator before it acts.
"""

from __future__ import annotations

import re
import zoneinfo
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from croniter import croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
DURATION = r"^[1-9][0-9]*(s|m|h|d|w|y)$"
_DURATION_UNITS = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
    "y": timedelta(days=365),
}
# A Kubernetes resource quantity: a decimal number with an optional binary or decimal suffix.
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
_QUANTITY_SUFFIXES = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """Schema extras with CEL rules ``(rule, message)`` the API server checks (``x-kubernetes-validations``).

    Used as ``model_config = ConfigDict(json_schema_extra=cel(...))`` or ``Field(json_schema_extra=cel(...))``;
    the model's own validator states the same invariant for the operator.
    """
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


class CamelModel(BaseModel):
    """Base for every API object part: camelCase on the wire, snake_case in Python, typos rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_api(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(CamelModel):
    """Status parts tolerate fields they do not know (older or newer operators wrote them)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def parse_duration(value: str) -> timedelta:
    """``30d`` -> 30 days. Units: s, m, h, d, w, y (365 days)."""
    match = re.fullmatch(DURATION, value)
    if match is None:
        raise ValueError(
            f"invalid duration {value!r}: use a positive number and one of s, m, h, d, w, y (e.g. 30d, 7y)"
        )
    return int(value[:-1]) * _DURATION_UNITS[value[-1]]


def parse_quantity(value: str) -> Decimal:
    """A Kubernetes quantity (``500m``, ``1Gi``) as a plain number, for comparisons."""
    match = re.fullmatch(QUANTITY, value)
    if match is None:
        raise ValueError(f"invalid quantity {value!r}: expected e.g. 500m, 2, 512Mi, 1Gi")
    suffix = match.group(2) or ""
    try:
        return Decimal(value[: len(value) - len(suffix)]) * _QUANTITY_SUFFIXES[suffix]
    except InvalidOperation as exc:  # pragma: no cover - the pattern already rules this out
        raise ValueError(f"invalid quantity {value!r}") from exc


def _check_cron(value: str) -> str:
    if len(value.split()) != 5 or not croniter.is_valid(value):
        raise ValueError(f"invalid cron expression {value!r}: expected 5 fields, e.g. '0 */6 * * *'")
    return value


def _check_duration(value: str) -> str:
    parse_duration(value)
    return value


def _check_time_zone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {value!r}: use an IANA name such as UTC or America/New_York") from exc
    return value


Cron = Annotated[
    str,
    Field(description="A standard 5-field cron expression, e.g. '0 */6 * * *'.", min_length=9),
    AfterValidator(_check_cron),
]
Duration = Annotated[
    str,
    Field(
        description="A duration: a positive integer and a unit s, m, h, d, w or y (365 days), e.g. 30d.",
        pattern=DURATION,
    ),
    AfterValidator(_check_duration),
]
TimeZone = Annotated[
    str,
    Field(description="An IANA time zone name, e.g. UTC or Europe/Berlin."),
    AfterValidator(_check_time_zone),
]
Quantity = Annotated[str, Field(description="A Kubernetes quantity, e.g. 500m, 2, 512Mi.", pattern=QUANTITY)]
ObjectName = Annotated[
    str,
    Field(
        description="The name of an object in the same namespace.", min_length=1, max_length=253, pattern=DNS_SUBDOMAIN
    ),
]
Port = Annotated[int, Field(description="A TCP port.", ge=1, le=65535)]


class SecretKeyRef(CamelModel):
    """One key of a Secret in the resource's namespace."""

    name: ObjectName = Field(description="Name of the Secret.")
    key: str = Field(description="Key within the Secret's data.", min_length=1, max_length=253, pattern=SECRET_KEY)


class ConfigMapKeyRef(CamelModel):
    """One key of a ConfigMap in the resource's namespace."""

    name: ObjectName = Field(description="Name of the ConfigMap.")
    key: str = Field(description="Key within the ConfigMap's data.", min_length=1, max_length=253, pattern=SECRET_KEY)


class CredentialsSecretRef(CamelModel):
    """A Secret holding a user name and a password under two keys."""

    name: ObjectName = Field(description="Name of the Secret.")
    username_key: str = Field(
        "username", description="Key holding the user name.", min_length=1, max_length=253, pattern=SECRET_KEY
    )
    password_key: str = Field(
        "password", description="Key holding the password.", min_length=1, max_length=253, pattern=SECRET_KEY
    )


class WorkloadRef(CamelModel):
    """A Deployment or StatefulSet in the resource's namespace."""

    kind: Literal["Deployment", "StatefulSet"] = Field("Deployment", description="Kind of the workload.")
    name: ObjectName = Field(description="Name of the workload.")


class LabelSelectorRequirement(CamelModel):
    """A label selector requirement, as in Kubernetes."""

    key: str = Field(description="The label key.", min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="How the key relates to values.")
    values: list[str] = Field(
        default_factory=list, description="Values for In and NotIn; empty for the others.", max_length=64
    )


class LabelSelector(CamelModel):
    """A Kubernetes label selector. An empty selector matches everything."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.matchExpressions) || self.matchExpressions.all(e, "
                "(e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0))",
                "matchExpressions: In and NotIn need values; Exists and DoesNotExist take none",
            ),
        )
    )

    match_labels: dict[str, str] = Field(default_factory=dict, description="Labels that must all match.")
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, description="Requirements that must all hold.", max_length=32
    )

    @model_validator(mode="after")
    def _check_values(self) -> LabelSelector:
        for index, expr in enumerate(self.match_expressions):
            if (expr.operator in ("In", "NotIn")) != bool(expr.values):
                raise ValueError(
                    f"matchExpressions[{index}]: operator {expr.operator} "
                    + ("needs values" if expr.operator in ("In", "NotIn") else "takes no values")
                )
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether an object with these labels is selected."""
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for expr in self.match_expressions:
            present = expr.key in labels
            ok = {
                "In": present and labels.get(expr.key) in expr.values,
                "NotIn": not present or labels.get(expr.key) not in expr.values,
                "Exists": present,
                "DoesNotExist": not present,
            }[expr.operator]
            if not ok:
                return False
        return True


class Condition(StatusModel):
    """A condition in the standard Kubernetes shape."""

    type: str = Field(description="Type of condition, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="Status of the condition.")
    reason: str = Field(description="A CamelCase reason for the last transition.")
    message: str = Field("", description="A human-readable message for the last transition.")
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The generation the condition was set for.")


class StatusBase(StatusModel):
    """Fields every kind's status has."""

    observed_generation: int | None = Field(None, description="The spec generation last acted on.")
    conditions: list[Condition] = Field(default_factory=list, description="Current observations.")
    phase: str | None = Field(None, description="A one-word summary of the state.")


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 string (or a datetime) as an aware UTC datetime; None for an empty value."""
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    return None


def rfc3339(moment: datetime) -> str:
    """As Kubernetes writes times: UTC, second precision, Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
