"""Policy reload: a watch on the policy files, SIGHUP under a server, and what every reload
checks before its chains are swapped in.

`Engine.reload()` loads the files, runs every lint rule that needs no app (`check`, through
the `Reload` hook), compiles, and swaps one snapshot, so each request sees the old chains
or the new ones.
A refused reload keeps the last good policy, logs each finding at file:line:col, keeps
them in `engine.last_reload_error` (for `/readyz`) and shows in the metrics below.

- `POLICYROUTE_RELOAD=1` (`policyroute run --reload`, `make run`) starts `Reloader`,
  which watches the policy files and reloads off the request path.
- Under `policyroute run` or uvicorn, in the main thread, `Hangup` reloads on SIGHUP
  (`kill -HUP <pid>`), with or without the watch. Elsewhere (tests, other servers, worker
  threads) it installs nothing and SIGHUP keeps its usual meaning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from ..errors import ConfigError, Finding, Location
from .engine import Engine, Hook

if TYPE_CHECKING:
    from ..language.loader import PolicySet

log = logging.getLogger("policyroute")

RELOADS = Counter(
    "policyroute_policy_reloads",
    "Policy reloads by outcome: applied, or refused (the last good policy stays).",
    ["outcome"],
)
RELOAD_OK = Gauge(
    "policyroute_policy_reload_ok",
    "1 while the running policy is what the files say; 0 after a refused reload.",
)
RELOAD_SECONDS = Histogram(
    "policyroute_policy_reload_seconds",
    "Time to load, lint and compile the policy files for a reload.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RELOAD_OK.set(1)

_SUFFIXES = (".yaml", ".yml")


def check(policies: PolicySet) -> None:
    """Refuse a reload whose policy has lint errors; log its warnings."""
    from ..review.lint import reload_findings

    findings = reload_findings(policies)
    for finding in findings:
        if finding.severity != "error":
            log.warning("policyroute: reload: %s", finding)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise ConfigError(errors)


def record(error: ConfigError | None, seconds: float) -> None:
    """Count one reload attempt in the metrics."""
    RELOADS.labels("refused" if error else "applied").inc()
    RELOAD_OK.set(0 if error else 1)
    RELOAD_SECONDS.observe(seconds)


_LOCKS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def reload_now(engine: Engine) -> ConfigError | None:
    """Reload once, one reload at a time per engine; any failure keeps the last good policy."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(engine, threading.Lock())
    with lock:
        try:
            return engine.reload()
        except Exception as exc:  # a bug in a maker must not end the watch or the server
            log.exception("policyroute: reload failed, keeping the last good policy")
            error = ConfigError(
                [Finding("reload-failed", f"reload failed: {exc!r}", Location("<reload>"))]
            )
            engine.last_reload_error = error
            record(error, 0.0)
            return error


async def reload_in_thread(engine: Engine) -> ConfigError | None:
    """Reload off the event loop: parsing and compiling are CPU work."""
    error = await asyncio.to_thread(reload_now, engine)
    if error is None:
        log.info("policyroute: policies reloaded: %s", engine.last_reload)
    return error


def _watch_targets(paths: list[str]) -> tuple[list[str], set[str], set[str]]:
    """Directories to watch, the files named directly, and the directories named."""
    dirs: set[str] = set()
    files: set[str] = set()
    for raw in paths:
        p = Path(raw).resolve()
        if p.is_dir():
            dirs.add(str(p))
        else:
            # Editors save by writing a new file and renaming it over the old one: watch
            # the directory, or the watch would follow the replaced file.
            files.add(str(p))
    watched = sorted(dirs | {str(Path(f).parent) for f in files})
    return watched, files, dirs


def is_policy_change(path: str, files: set[str], dirs: set[str]) -> bool:
    """A change to a policy file: one named directly, or a YAML file directly in a directory."""
    p = Path(path)
    if str(p) in files:
        return True
    name = p.name
    return p.suffix in _SUFFIXES and not name.startswith((".#", "#")) and str(p.parent) in dirs


class Reloader:
    """Background task: watch the policy files, then reload off the request path."""

    def __init__(self, engine: Engine, *, debounce_ms: int = 50, step_ms: int = 20) -> None:
        self.engine = engine
        self.debounce_ms = debounce_ms
        self.step_ms = step_ms
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.reloads = 0
        self.targets, self._files, self._dirs = _watch_targets(engine.paths)

    async def start(self) -> None:
        """Begin watching."""
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._watch(), name="policyroute-reloader")

    async def ready(self) -> None:
        """Wait until the watch is in place (changes before this may be missed)."""
        await self._ready.wait()

    async def _watch(self) -> None:
        from watchfiles import awatch

        watch = awatch(
            *self.targets,
            stop_event=self._stop,
            debounce=self.debounce_ms,
            step=self.step_ms,
            recursive=False,
            yield_on_timeout=True,
            rust_timeout=200,
        )
        try:
            async for changes in watch:
                self._ready.set()
                if not any(is_policy_change(p, self._files, self._dirs) for _, p in changes):
                    continue
                await reload_in_thread(self.engine)
                self.reloads += 1
        except Exception:  # a vanished directory, an OS watch limit: say so, keep serving
            log.exception("policyroute: the policy watch stopped; SIGHUP still reloads")
        finally:
            self._ready.set()

    async def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        self._ready.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _under_server() -> bool:
    """True inside a uvicorn server (it holds SIGINT while it serves), in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    handler: Any = signal.getsignal(signal.SIGINT)
    owner = getattr(handler, "__self__", None)
    return type(owner).__module__.startswith("uvicorn.") if owner is not None else False


class Hangup:
    """Reload on SIGHUP, installed only under a server in the main thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.installed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Install the SIGHUP handler when serving under uvicorn in the main thread."""
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None or not _under_server():
            return
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(sighup, self._on_signal)
        except (NotImplementedError, RuntimeError, ValueError):
            return
        self.installed = True
        log.info("policyroute: SIGHUP reloads the policies")

    def _on_signal(self) -> None:
        log.info("policyroute: SIGHUP received, reloading the policies")
        task = asyncio.get_running_loop().create_task(reload_in_thread(self.engine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Remove the handler and let a running reload finish."""
        if self.installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self.installed = False
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class Reload(Hook):
    """Reload as an engine feature: lint's checks before a reload compiles, its metrics,
    the watch of the policy files (`POLICYROUTE_RELOAD`) and SIGHUP under a server."""

    def attach(self, engine: Engine) -> None:
        """Add the watch (when the settings ask for it) and the SIGHUP service."""
        added: dict[str, Any] = {}
        if engine.config.reload and "reloader" not in engine.services:
            added["reloader"] = Reloader(engine)
        if not any(isinstance(s, Hangup) for s in engine.services.values()):
            added["sighup"] = Hangup(engine)
        engine.services = {**engine.services, **added}

    def check(self, engine: Engine, policies: PolicySet) -> None:
        """Refuse a reload whose policy has lint errors."""
        check(policies)

    def reloaded(self, engine: Engine, error: ConfigError | None, seconds: float) -> None:
        """Count the reload."""
        record(error, seconds)
