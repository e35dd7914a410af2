"""The base every API model derives from, and the rule type that keeps CEL and Python in step.

Each cross-field rule is written once as a `Rule`: its CEL text goes into the CRD schema as
`x-kubernetes-validations` (checked by the API server at admission) and its Python twin runs
as a pydantic validator (checked by the local runtime and the trainer), side by side, so the
two cannot drift apart unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, to_jsonable_python

T = TypeVar("T")


class Rule(NamedTuple):
    """A cross-field rule: CEL for the API server, `check` for Python, one message for both."""

    cel: str
    message: str
    check: Callable[[Any], bool]
    # Where the API server reports a failure, relative to the object the rule sits on
    # (".maxReplicas"); None reports the object itself.
    field_path: str | None = None


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors, as with
    `kubectl apply` (whose server-side field validation is strict by default), and types are
    strict as in the API server's JSON schema ("yes" is no boolean, "4" no integer)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        protected_namespaces=(),
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in type(self).cel_rules:
            if not rule.check(self):
                where = rule.field_path.lstrip(".") + ": " if rule.field_path else ""
                raise ValueError(where + rule.message)
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        # pydantic leaves default_factory out of the schema; the CRD needs the value so that
        # the API server defaults (and checks CEL rules against) exactly what pydantic would.
        properties = schema.get("properties", {})
        for name, info in cls.model_fields.items():
            prop = properties.get(info.alias or name)
            if prop is not None and info.default_factory is not None and "default" not in prop:
                prop["default"] = to_jsonable_python(
                    info.get_default(call_default_factory=True), by_alias=True, exclude_none=True
                )
        if cls.cel_rules:
            schema["x-kubernetes-validations"] = [_cel(rule) for rule in cls.cel_rules]
        return schema

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(ApiModel):
    """Status is written by the operator; a newer operator's extra fields are ignored, and
    timestamps arrive as RFC 3339 strings."""

    model_config = ConfigDict(extra="ignore", strict=False)


def _cel(rule: Rule) -> dict[str, str]:
    entry = {"rule": rule.cel, "message": rule.message}
    if rule.field_path:
        entry["fieldPath"] = rule.field_path
    return entry


def nested(model: type[ApiModel], description: str, **extra: Any) -> Any:
    """A sub-object whose fields all have defaults. Its CRD default is the fully defaulted
    object (the API server checks CEL rules against a default as written, without filling in
    nested defaults first), so server and pydantic default the same way."""
    return Field(default_factory=model, description=description, json_schema_extra=extra or None)


def exactly_one(obj: object, *attributes: str) -> bool:
    return sum(getattr(obj, name) is not None for name in attributes) == 1


def cel_exactly_one(*fields: str) -> str:
    return " + ".join(f"(has(self.{name}) ? 1 : 0)" for name in fields) + " == 1"


def distinct(values: list[T]) -> list[T]:
    """Pydantic twin of `x-kubernetes-list-type: set`: the API server rejects duplicates."""
    if len(set(map(repr, values))) != len(values):
        raise ValueError(f"values must be distinct, got {values}")
    return values
