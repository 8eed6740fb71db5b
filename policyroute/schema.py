"""The JSON Schema of the policy language, for editors and CI."""

from __future__ import annotations

import json
from typing import Any

from .policy import METHODS, PolicyFile

ROUTE_KEY_PATTERN = f"^({'|'.join(METHODS)}) /\\S*$"


def policy_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one policy file."""
    schema = PolicyFile.model_json_schema(mode="validation")
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


def _allow_null_removal(props: dict[str, Any]) -> None:
    """`key: null` removes an inherited value; every route key accepts null."""
    for name, prop in list(props.items()):
        if "anyOf" in prop and {"type": "null"} in prop["anyOf"]:
            continue
        props[name] = {"anyOf": [prop, {"type": "null"}]}


def schema_text() -> str:
    """The schema as stable, pretty JSON text."""
    return json.dumps(policy_schema(), indent=2, sort_keys=True) + "\n"
