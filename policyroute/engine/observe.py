"""What `policyroute.install` sets up for observability: sanitized logs, health routes."""

from __future__ import annotations

from fastapi import FastAPI

from ..observability.health import add_routes
from ..observability.logs import REDACTION, configure_logging, protect
from .engine import Engine, Hook


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


class Observe(Hook):
    """The observability an engine attaches at install (`install(health=, metrics=)`)."""

    def __init__(self, *, health: bool, metrics: bool) -> None:
        self.health = health
        self.metrics = metrics

    def attach(self, engine: Engine) -> None:
        """Sanitize logs and add the routes asked for."""
        observe(engine.app, engine, health=self.health, metrics=self.metrics)
