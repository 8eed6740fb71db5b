"""`/healthz`, `/readyz` and `/metrics`: ordinary routes, governed by the policy like any other.

`add_routes(app)` (or `policyroute.install(app, ..., health=True, metrics=True)`) adds them.
A route with no policy is denied (403 no-policy), so the policy file names them, e.g.:

```yaml
routes:
  GET /healthz: {public: true}
  GET /readyz: {public: true, ip_allowlist: [10.0.0.0/8, 127.0.0.1/32]}
  GET /metrics: {public: true, ip_allowlist: [10.0.0.0/8]}
```

- `/healthz` (liveness): 200 while the process serves requests.
- `/readyz` (readiness): 200 when Valkey answers a PING, the Pulsar broker accepts a TCP
  connection and the policies are loaded; otherwise 503. The body names each check and the
  last policy reload error, if any (the last good policy keeps serving meanwhile).
- `/metrics`: prometheus_client's default registry in the text exposition format.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..config import Settings
from ..errors import ConfigError

HEALTHZ, READYZ, METRICS = "/healthz", "/readyz", "/metrics"
NO_STORE = {"cache-control": "no-store"}


class InstalledEngine(Protocol):
    """What readiness reads of the installed engine (`policyroute.Engine`)."""

    config: Settings
    services: Mapping[str, Any]
    last_reload_error: ConfigError | None

    @property
    def snapshot(self) -> Any:
        """The policies and chains in use (`.policies.routes`)."""
        ...


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"}, headers=NO_STORE)


async def readyz(request: Request) -> Response:
    """Readiness: backends reachable and policies loaded (503 otherwise)."""
    engine: InstalledEngine | None = getattr(request.app.state, "policyroute", None)
    if engine is None:
        return JSONResponse(
            {"status": "unready", "checks": {"policies": {"ok": False}}},
            status_code=503,
            headers=NO_STORE,
        )
    checks = await readiness(engine)
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unready", "checks": checks},
        status_code=200 if ready else 503,
        headers=NO_STORE,
    )


async def metrics(request: Request) -> Response:
    """Every metric of the default registry (policyroute's and the application's)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def readiness(
    engine: InstalledEngine, limit: float | None = None
) -> dict[str, dict[str, Any]]:
    """Each readiness check by name: `ok` plus what it saw."""
    limit = limit if limit is not None else engine.config.ready_timeout
    checks: dict[str, dict[str, Any]] = {"policies": _policies(engine)}
    probes: dict[str, Any] = {}
    store = engine.services.get("valkey")
    if store is not None and hasattr(store, "ping"):
        probes["valkey"] = _timed(store.ping(), limit)
    bus = engine.services.get("pulsar")
    if bus is not None and getattr(bus, "url", None):
        probes["pulsar"] = _timed(_reachable(bus.url, limit), limit)
    results = await asyncio.gather(*probes.values())
    for name, result in zip(probes, results, strict=True):
        checks[name] = result
    if "pulsar" in checks and bus is not None:
        checks["pulsar"]["unsaved_events"] = int(getattr(bus, "unsaved", 0))
    return checks


def _policies(engine: InstalledEngine) -> dict[str, Any]:
    error = engine.last_reload_error
    return {
        "ok": True,
        "routes": len(engine.snapshot.policies.routes),
        "last_reload_error": str(error) if error is not None else None,
    }


async def _timed(probe: Any, limit: float) -> dict[str, Any]:
    started = time.perf_counter()
    ok = False
    with contextlib.suppress(Exception):
        async with asyncio.timeout(limit):
            ok = bool(await probe)
    return {"ok": ok, "ms": round((time.perf_counter() - started) * 1000, 2)}


async def _reachable(url: str, limit: float) -> bool:
    """True when one of the broker addresses of a pulsar:// URL accepts a TCP connection."""
    parts = urlsplit(url)
    default = 6651 if parts.scheme.endswith("+ssl") else 6650
    for address in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
        with contextlib.suppress(OSError, TimeoutError, ValueError):
            async with asyncio.timeout(limit):
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port or default))
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
    return False


def add_routes(app: FastAPI, *, health: bool = True, metrics_route: bool = True) -> None:
    """Add `/healthz` and `/readyz` (health) and `/metrics`; the policy must govern them."""
    if health:
        app.add_api_route(HEALTHZ, healthz, methods=["GET"], include_in_schema=False)
        app.add_api_route(READYZ, readyz, methods=["GET"], include_in_schema=False)
    if metrics_route:
        app.add_api_route(METRICS, metrics, methods=["GET"], include_in_schema=False)
