"""Process settings from the environment (prefix `POLICYROUTE_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._types import ByteSize


class Settings(BaseSettings):
    """Where the policies and backends are; every field reads `POLICYROUTE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="POLICYROUTE_", extra="ignore", frozen=True)

    policies: str = Field(
        default="policies", description="Policy directory or file(s), comma-separated."
    )
    valkey_url: str | None = Field(default=None, description="redis:// or valkey:// URL of Valkey.")
    valkey_cluster: bool = Field(default=False, description="Treat valkey_url as a cluster seed.")
    pulsar_url: str | None = Field(default=None, description="pulsar:// URL of the Pulsar broker.")
    reload: bool = Field(default=False, description="Watch the policy files and reload on change.")
    strict: bool = Field(default=False, description="Refuse to start when a route has no policy.")
    offline: bool = Field(
        default=False, description="Compile without backends (set by lint and explain)."
    )
    key_prefix: str = Field(default="pr", description="Prefix of every Valkey key.")
    data_keys_file: Path | None = Field(
        default=None,
        description="A file holding the data keys (`kid:base64,...`, as POLICYROUTE_DATA_KEYS "
        "takes them), read when POLICYROUTE_DATA_KEYS is not set: a dev key, or keys "
        "mounted as a secret file. Not read by lint and explain (offline).",
    )
    request_id_header: str = Field(
        default="x-request-id", description="Header carrying a request id."
    )
    max_header_bytes: int = Field(
        default=16384,
        ge=1024,
        description="Largest header value read, a field repeated on several lines counted "
        "joined: a request with a larger one is answered 431 (header-too-large) before any "
        "step runs.",
    )
    max_body: ByteSize = Field(
        default=1 << 20,
        description="Largest request body a step reads whole (idempotency, encrypt_fields, "
        "retry) on a route whose `request.max_body` does not say: a larger one is answered "
        "413 (body-too-large), before it is read when its Content-Length says so.",
    )
    events_queue_size: int = Field(
        default=10_000,
        ge=1,
        description="Events held in memory awaiting the broker, and again awaiting the outbox.",
    )
    events_send_timeout: float = Field(
        default=5.0, gt=0, description="Seconds a publication may take before the outbox takes it."
    )
    events_flush_timeout: float = Field(
        default=5.0, gt=0, description="Seconds shutdown waits to publish, then to save, events."
    )
    events_max_body: int = Field(
        default=1 << 20, ge=0, description="Largest request or response body read for event fields."
    )
    outbox_batch: int = Field(
        default=100, ge=1, description="Outbox entries a relay reads at once."
    )
    outbox_poll: float = Field(
        default=0.5, gt=0, description="Seconds between outbox polls when it looks empty."
    )
    outbox_claim_idle: float = Field(
        default=30.0, gt=0, description="Seconds before a relay takes over another's pending entry."
    )

    log_redact_fields: str = Field(
        default="",
        description="Comma-separated field names (PII) logs never show, besides credentials, "
        "TOTP codes and idempotency keys.",
    )
    log_json: bool = Field(
        default=False,
        description="At install, log JSON lines (with request id, sanitized) to stderr.",
    )
    ready_timeout: float = Field(
        default=1.0, gt=0, description="Seconds each /readyz check may take."
    )
    gc_freeze: bool = Field(
        default=True,
        description="After startup, move every live object out of the garbage collector's "
        "reach (gc.freeze) so full collections stay short under load.",
    )
    gc_threshold: int = Field(
        default=10_000,
        ge=0,
        description="After startup, the collector's young-generation threshold (the first "
        "value of gc.set_threshold). Requests in flight keep thousands of young objects "
        "alive; at CPython's default of 700 a collection that scans them all runs every few "
        "requests. 0 leaves the interpreter's setting.",
    )

    def policy_paths(self) -> list[str]:
        """The policy paths as a list."""
        return [p.strip() for p in self.policies.split(",") if p.strip()]
