"""An app that cannot start says why in its findings' lines, not in a traceback.

`install` raises ConfigError at import time, under a server that imports the app
(`uvicorn service.main:app`): the error reaches the top of the process, where a traceback
through the server's importer would bury the one line that says what to fix.
"""

from __future__ import annotations

import sys
from types import TracebackType

from ..errors import ConfigError


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
