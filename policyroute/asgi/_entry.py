"""Whether a route's endpoint function ran, for FastAPI routes that may answer without it.

FastAPI validates a request (body, query, path, headers, dependencies) inside the route,
after the chain has let it on and before it calls the endpoint function: a request it
refuses (422, 400 for a body it cannot parse, a dependency's HTTPException) never ran the
handler. The gate arms each FastAPI route it resolves: the route's `dependant.call` (the
one the route's handler calls) is wrapped so that calling it marks the request's
`Entered` object, which the state step sets in `ENTERED` around the handler. Credits are
then charged only for a request whose endpoint was entered.

The wrapper is a plain function that returns what the endpoint returns (a coroutine, a
generator or a value), with `__wrapped__` set: FastAPI classifies it as the endpoint it
wraps and calls it as before. Only plain functions and methods are wrapped; a route whose
endpoint is another kind of callable, or that has no dependant, is not armed and counts as
run whenever the chain calls it (the behaviour of every non-FastAPI route).
"""

from __future__ import annotations

import functools
import inspect
from contextvars import ContextVar
from typing import Any, Final, Protocol


class Entered(Protocol):
    """What the endpoint marks when it is called."""

    handler_ran: bool


# The request's `Entered`, set by the state step while the handler runs (None otherwise).
ENTERED: Final[ContextVar[Entered | None]] = ContextVar("policyroute_entered", default=None)

_MARK = "__policyroute_marks_entry__"


def _marking(call: Any) -> Any:
    """`call`, marking the current request's `Entered` first."""

    @functools.wraps(call)
    def entered(*args: Any, **kwargs: Any) -> Any:
        cell = ENTERED.get()
        if cell is not None:
            cell.handler_ran = True
        return call(*args, **kwargs)

    setattr(entered, _MARK, True)
    return entered


def arm(route: Any) -> bool:
    """Make a FastAPI route's endpoint mark its entry (idempotent); whether it now does."""
    dependant: Any = getattr(route, "dependant", None)
    call = getattr(dependant, "call", None)
    if call is None:
        return False
    if getattr(call, _MARK, False):
        return True
    if not (inspect.isfunction(call) or inspect.ismethod(call)):
        return False
    try:
        dependant.call = _marking(call)
    except (AttributeError, TypeError):  # a dependant that does not take the wrapper
        return False
    return True
