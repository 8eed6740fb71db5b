"""The default backend services an engine creates from its settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..backends.offline import OFFLINE_PULSAR_URL, OFFLINE_VALKEY_URL
from ..backends.valkey import ValkeyStore
from ..crypto import Keyring

if TYPE_CHECKING:
    from .engine import Engine


def default_services(engine: Engine) -> dict[str, Any]:
    """Valkey when `POLICYROUTE_VALKEY_URL` is set, the data keys (`POLICYROUTE_DATA_KEYS`,
    else `POLICYROUTE_DATA_KEYS_FILE`) and Pulsar when `POLICYROUTE_PULSAR_URL` is set."""
    services: dict[str, Any] = {}
    config = engine.config
    url = config.valkey_url or (OFFLINE_VALKEY_URL if config.offline else None)
    if url:
        services["valkey"] = ValkeyStore(
            url, prefix=config.key_prefix, cluster=config.valkey_cluster
        )
    keyring = Keyring.from_env()
    if keyring is None and config.offline:
        # lint and explain compile sealed routes without the real keys; nothing is stored
        keyring = Keyring.parse(Keyring.generate("offline"))
    if keyring is None and config.data_keys_file is not None:
        keyring = Keyring.from_file(config.data_keys_file)
    if keyring is not None:
        services["keyring"] = keyring
    pulsar_url = config.pulsar_url or (OFFLINE_PULSAR_URL if config.offline else None)
    if pulsar_url:
        from ..events.bus import EventBus

        # After Valkey, so shutdown stops it first: its last events go to the Valkey outbox.
        services["pulsar"] = EventBus(
            pulsar_url,
            store=services.get("valkey"),
            keyring=keyring,
            config=config,
            offline=config.offline,
        )
    return services
