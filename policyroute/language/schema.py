"""The JSON Schema of the policy language, for editors and CI."""

from __future__ import annotations

import json
from typing import Any

from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from .policy import METHODS, PolicyFile

ROUTE_KEY_PATTERN = f"^({'|'.join(METHODS)}) /\\S*$"


def policy_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one policy file."""
    schema = PolicyFile.model_json_schema(mode="validation", schema_generator=_FactoryDefaults)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "policyroute policy file"
    defs = schema["$defs"]
    route = defs["RoutePolicy"]["properties"]
    # Shorthands the loader accepts: one mapping for a list of limits, a word for mfa.
    route["rate_limit"] = {
        "anyOf": [
            {"$ref": "#/$defs/RateLimit"},
            {"type": "array", "items": {"$ref": "#/$defs/RateLimit"}},
        ],
        "description": "One limit or a list of limits.",
        "default": [],
    }
    route["mfa"] = {"anyOf": [{"const": "required"}, {"$ref": "#/$defs/Mfa"}, {"type": "null"}]}
    route["replay"] = {
        "anyOf": [{"const": "jti"}, {"$ref": "#/$defs/Replay"}, {"type": "null"}],
        "description": route["replay"].get("description", ""),
    }
    # One duration for `jwks_refresh` fixes the interval (min = max).
    refresh = defs["Issuer"]["properties"]["jwks_refresh"]
    duration = defs["JwksRefresh"]["properties"]["min"]["anyOf"]
    refresh["anyOf"] = [{"$ref": refresh.pop("$ref")}, *duration]
    schema["properties"]["routes"]["propertyNames"] = {"pattern": ROUTE_KEY_PATTERN}
    _allow_null_removal(route)
    return schema


class _FactoryDefaults(GenerateJsonSchema):
    """Defaults made by a factory (`[]`, `[RS256]`) shown like any other default."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()  # type: ignore[call-arg]
        return super().get_default_value(schema)


# Annotations an editor reads from the property itself, not from inside its `anyOf`.
_ANNOTATIONS = ("title", "description", "default")


def _allow_null_removal(props: dict[str, Any]) -> None:
    """`key: null` removes an inherited value; every route key accepts null."""
    for name, prop in list(props.items()):
        if "anyOf" in prop and {"type": "null"} in prop["anyOf"]:
            continue
        inner = dict(prop)
        outer = {k: inner.pop(k) for k in _ANNOTATIONS if k in inner}
        props[name] = {"anyOf": [inner, {"type": "null"}], **outer}


def schema_text() -> str:
    """The schema as stable, pretty JSON text."""
    return json.dumps(policy_schema(), indent=2, sort_keys=True) + "\n"
