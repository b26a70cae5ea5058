"""``BudgetLedger``: the budgets of a delegation chain, shared by every branch of its tree.

A chain's first link may set a call budget (requests the whole tree may make) and an opaque
cost budget (LLM tokens, money) that handlers spend with ``ctx.spend``; later links may only
lower them. Each callee debits the call before its handler runs, and each ``ctx.spend`` its
cost, in one record per chain in the replicated bucket ``<prefix>-budgets`` (key: the chain's
id), with a compare-and-set update: concurrent branches on any instance draw from the same
total, and whatever the links say, the tree never spends more than the smallest budget of
the links it came through (``docs/protocol.md`` section 37).
"""

from __future__ import annotations

import asyncio
import random

import msgpack

from mesh._core.delegation import Delegation
from mesh._core.names import budgets_bucket
from mesh._transport.base import KeyValueBucket, Transport
from mesh.errors import FailedPrecondition, ResourceExhausted

__all__ = ["BUDGET_WINDOW", "BudgetLedger"]

BUDGET_WINDOW = 24 * 3600.0
"""How long a chain's spending is kept (the bucket's max age): longer than any deadline."""
_ATTEMPTS = 50


class BudgetLedger:
    """Debits of delegation budgets, for one instance.

    Args:
        transport: the broker connection.
        prefix: the mesh's subject prefix (names the bucket).
        replicas: JetStream replicas of the bucket (``None``: by cluster size).
    """

    def __init__(self, transport: Transport, prefix: str, replicas: int | None) -> None:
        self._transport = transport
        self.name = budgets_bucket(prefix)
        self._replicas = replicas
        self._kv: KeyValueBucket | None = None
        self._opening = asyncio.Lock()

    async def _bucket(self) -> KeyValueBucket:
        if self._kv is None:
            async with self._opening:
                if self._kv is None:
                    self._kv = await self._transport.key_value(
                        self.name, ttl=BUDGET_WINDOW, replicas=self._replicas
                    )
        return self._kv

    async def spend(self, chain: Delegation, calls: int, cost: int = 0) -> None:
        """Debit ``calls`` requests and ``cost`` from ``chain``'s budgets, or refuse.

        Raises:
            ResourceExhausted: a budget would be exceeded (nothing is debited); no retry-after:
                a spent budget does not come back.
            Unavailable: the bucket could not be reached.
        """
        kv = await self._bucket()
        key = chain.chain.hex()
        for _ in range(_ATTEMPTS):
            entry = await kv.entry(key)
            spent_calls, spent_cost = 0, 0
            if entry is not None:
                spent_calls, spent_cost = _decode(entry[0])
            if chain.budget is not None and spent_calls + calls > chain.budget:
                raise ResourceExhausted(
                    f"the delegation budget of {chain.describe} is spent: "
                    f"{spent_calls} of {chain.budget} calls made"
                )
            if chain.cost is not None and spent_cost + cost > chain.cost:
                raise ResourceExhausted(
                    f"the delegation cost budget of {chain.describe} would be exceeded: "
                    f"{spent_cost} of {chain.cost} spent, {cost} more asked"
                )
            value = msgpack.packb([spent_calls + calls, spent_cost + cost])
            try:
                if entry is None:
                    # A deleted record counts as existing: deleting it must not give the
                    # budget back.
                    await kv.create_fresh(key, value)
                else:
                    await kv.update(key, value, entry[1])
                return
            except FailedPrecondition:  # another branch debited first: read again
                if entry is None and await kv.entry(key) is None:
                    raise ResourceExhausted(
                        f"the budget record of {chain.describe} was deleted: what was spent "
                        "is unknown, so nothing more is"
                    ) from None
                await asyncio.sleep(random.uniform(0, 0.005))
        raise ResourceExhausted(f"the delegation budget of {chain.describe} is too contended")


def _decode(raw: bytes) -> tuple[int, int]:
    try:
        calls, cost = msgpack.unpackb(raw)
    except Exception:
        # Not a ledger value (someone wrote the bucket): count it as spent, refusing closed.
        return 2**62, 2**62
    if type(calls) is not int or type(cost) is not int:
        return 2**62, 2**62
    return calls, cost
