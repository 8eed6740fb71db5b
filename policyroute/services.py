"""The default backend services an engine creates from its settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends.valkey import ValkeyStore

if TYPE_CHECKING:
    from .binding import Engine


def default_services(engine: Engine) -> dict[str, Any]:
    """Valkey when `POLICYROUTE_VALKEY_URL` is set; more backends join as steps need them."""
    services: dict[str, Any] = {}
    config = engine.config
    if config.valkey_url:
        services["valkey"] = ValkeyStore(
            config.valkey_url, prefix=config.key_prefix, cluster=config.valkey_cluster
        )
    if config.reload:
        from .reloader import Reloader

        services["reloader"] = Reloader(engine)
    return services
