"""Credit balances in Valkey: grant, show and set, for the CLI and for applications.

A principal's account is a hash at `<prefix>:{s:<account>}:credits` with the granted
balance `b`, the periodic allowance left `a` and the allowance period `p`. Credits
reserved by a running request sit in the sorted set `...:credits:held` (member
`from_allowance:from_balance:period:token`, scored by expiry); a reservation whose
request never finished is refunded after `credits.hold`. Anonymous
callers of public routes are charged by client address (`ip=True`).

`account` is the principal's account name (`identity.accounts.Accounts.name`): its
subject when one issuer is configured and no tenant claim, else a name that also holds
issuer and tenant (`policyroute credits --issuer --tenant` makes it from the policy
settings).

A running request's hold is renewed every quarter of `hold`, so only a process that
stopped (died, or stalled for most of `hold`) loses its reservations to the next charge,
which refunds them and remembers them for a day in `...:credits:swept`. A request that
still commits one of those is charged again then, once; the balance may go below zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backends.valkey import ValkeyStore
from ..principal import address_tag, subject_tag


def account_tag(account: str, *, ip: bool = False) -> str:
    """The hash tag of an account: `s:<account>`, or `ip:<address>` for anonymous callers."""
    return address_tag(account) if ip else subject_tag(account)


def balance_key(store: ValkeyStore, tag: str) -> str:
    """The Valkey key of an account's balance."""
    return store.key(tag, "credits")


@dataclass(frozen=True, slots=True)
class Balance:
    """An account as stored: granted credits plus what is left of the allowance."""

    granted: int
    allowance: int
    period: str
    held: int = 0  # reserved by requests still running (or lost, until refunded)

    @property
    def total(self) -> int:
        """What the account can spend now (an allowance not yet reset counts as stored)."""
        return self.granted + self.allowance


async def grant(store: ValkeyStore, account: str, amount: int, *, ip: bool = False) -> int:
    """Add `amount` (may be negative) to the granted balance; return the new total."""
    key = balance_key(store, account_tag(account, ip=ip))
    await store.command("HINCRBY", key, "b", amount, operation="credits grant")
    return (await show(store, account, ip=ip)).total


async def set_balance(store: ValkeyStore, account: str, amount: int, *, ip: bool = False) -> None:
    """Set the granted balance to exactly `amount`."""
    key = balance_key(store, account_tag(account, ip=ip))
    await store.command("HSET", key, "b", amount, operation="credits set")


async def set_allowance(store: ValkeyStore, account: str, amount: int, *, ip: bool = False) -> None:
    """Set what is left of the current period's allowance (the next period resets it)."""
    key = balance_key(store, account_tag(account, ip=ip))
    await store.command("HSET", key, "a", amount, operation="credits set allowance")


async def show(store: ValkeyStore, account: str, *, ip: bool = False) -> Balance:
    """The balance of an account (zeros when it has none)."""
    key = balance_key(store, account_tag(account, ip=ip))
    raw = await store.command("HMGET", key, "b", "a", "p", operation="credits show")
    b, a, p = (x.decode() if isinstance(x, bytes) else x for x in raw)
    holds = await store.command("ZRANGE", key + ":held", 0, -1, operation="credits show")
    held = 0
    for member in holds:
        from_a, from_b, _ = (member.decode() if isinstance(member, bytes) else member).split(":", 2)
        held += int(from_a) + int(from_b)
    return Balance(int(b or 0), int(a or 0), p or "", held)
