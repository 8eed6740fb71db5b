"""What `policyroute.install` sets up for observability, in one call."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from ..observability.health import add_routes
from ..observability.logs import REDACTION, configure_logging, protect
from ..observability.requests import RequestIds

if TYPE_CHECKING:
    from ..config import Settings
    from .engine import Engine


def request_ids(config: Settings) -> RequestIds:
    """The request-id reader of an engine (header from `POLICYROUTE_REQUEST_ID_HEADER`)."""
    return RequestIds(config.request_id_header)


def observe(app: FastAPI, engine: Engine, *, health: bool, metrics: bool) -> None:
    """Sanitize logs for this app's secrets, and add the health and metrics routes asked for."""
    config = engine.config
    REDACTION.add_keys(config.log_redact_fields.split(","))
    policies = engine.snapshot.policies
    headers = [policies.settings.auth.totp.header]
    headers += [
        e.policy.idempotency.header for e in policies.routes.values() if e.policy.idempotency
    ]
    REDACTION.add_headers(headers)
    if config.log_json:
        configure_logging()
    protect()
    if health or metrics:
        add_routes(app, health=health, metrics_route=metrics)
