"""An app that cannot start says why in its findings' lines, not in a traceback.

`install` raises ConfigError at import time, under a server that imports the app
(`uvicorn service.main:app`): the error reaches the top of the process, where a traceback
through the server's importer would bury the one line that says what to fix.

In the server's own process that top is `sys.excepthook` (`briefly`). A worker process a
supervisor spawned (`uvicorn --workers N` and `--reload` start them with `multiprocessing`)
never reaches it: the child's bootstrap prints the traceback of any exception but
SystemExit, whose integer code it exits with silently. So there `install` prints the
findings itself and raises them as a ConfigError that is also a SystemExit with code 3,
uvicorn's startup failure, on which its supervisor stops instead of starting the worker
again (`in_worker`). Any `multiprocessing` child counts as a worker: one that catches the
error still catches a ConfigError, after its findings were printed.
"""

from __future__ import annotations

import sys
from types import TracebackType

from ..errors import ConfigError

# The exit code of a uvicorn worker that failed before serving (uvicorn.config).
STARTUP_FAILURE = 3


class WorkerStartupError(ConfigError, SystemExit):
    """A ConfigError in a worker process: caught, a ConfigError; uncaught, exit code 3."""

    def __init__(self, error: ConfigError) -> None:
        super().__init__(error.findings)
        self.code = STARTUP_FAILURE


def _hook(
    kind: type[BaseException], value: BaseException, trace: TracebackType | None
) -> None:
    if isinstance(value, ConfigError):
        print(value, file=sys.stderr)
        return
    sys.__excepthook__(kind, value, trace)


def briefly() -> None:
    """Print an uncaught ConfigError's findings alone (unless a hook of the app's is set)."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _hook


def in_worker(error: ConfigError) -> None:
    """In a worker process a supervisor spawned: print the findings, raise them to end it."""
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return
    # Printed now: the child's bootstrap writes nothing for a SystemExit with a code.
    print(error, file=sys.stderr, flush=True)
    raise WorkerStartupError(error) from None
