"""Shadow mode: `enforce: false` evaluates a policy and records what it would have refused.

Where it applies:

- a route (`enforce: false`): every guard (ip_allowlist, auth, scopes, roles, mfa), the
  rate limits, the credits, and a missing or malformed Idempotency-Key run in shadow
  mode. The response is whatever the handler answers; a shadowed auth failure leaves the
  caller anonymous. Idempotency conflicts (409 in flight, 422 reused key) are still
  enforced: they keep a request from running twice. Cache, events, retry, breaker and
  timeout work as configured.
- one step: `rate_limit` (each limit), `credits`, `mfa` and `replay` accept `enforce: false`,
  and so does `settings.auth.lockout` (for every route).

What "evaluate" means for stateful steps:

- a shadowed limit counts in its own bucket (key `rls` instead of `rl`), exactly as the
  enforced limit would, so its would-be refusals are the ones enforcement would make; the
  caller's real bucket is never touched, so turning enforcement on later starts them with
  a full budget;
- shadowed credits read the balance (with the allowance and reservations the next charge
  would see) and never reserve, charge or refund; a request answered from the cache or an
  idempotent replay would not be charged, so it is never a would-be refusal;
- shadowed MFA checks a step-up claim as usual and verifies a TOTP code without using it
  up or counting a failure (a replayed code is not detected in shadow mode);
- a shadowed throttle never delays (a would-be wait is counted as `shadow_delayed`), a
  shadowed debounce never joins (a would-be join is counted as `shadow_joined`, a would-be
  refusal recorded like any limit's);
- a shadowed lockout counts failures in keys of its own (`los`) and never refuses; a
  would-be 429 is recorded as `auth-locked`;
- shadowed one-time tokens are taken in keys of their own (`jtis`); a reuse, or a token
  without a jti, is recorded and let on.

Each would-be refusal is counted in `policyroute_shadow_denials_total{route,step,reason}`,
logged at WARNING on `policyroute.shadow` and named on the request's span. Only the first
one of a request is recorded: enforcement would have stopped there.
"""

from __future__ import annotations

import logging

from ..compile.step import Context
from ..errors import Denial

log = logging.getLogger("policyroute.shadow")


def shadow_denial(ctx: Context, step: str, denial: Denial) -> None:
    """Record a denial a shadowed step did not enforce (the first of the request only)."""
    if ctx.shadowed is not None:
        return
    reason = denial.problem.slug
    ctx.shadowed = reason
    ctx.meter.shadow(step, reason)
    if ctx.span is not None:
        ctx.note("shadow.denied", reason)
        ctx.note("shadow.step", step)
    log.warning(
        "policyroute: shadow: %s would be refused by %s (%s, %d)",
        ctx.route,
        step,
        reason,
        denial.status,
        extra={"route": ctx.route, "step": step, "reason": reason, "status": denial.status},
    )
