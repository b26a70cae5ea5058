"""Token buckets and the callee's rate limiter (per (caller, endpoint), and per endpoint
shared fairly among its callers).

Pure core: no I/O, an injectable clock, no sleeps in tests.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from mesh._core.policy import RateLimitSpec
from mesh.errors import InvalidArgument

__all__ = ["ACTIVE_WINDOW_S", "RateLimiter", "SharedBucket", "TokenBucket"]

Clock = Callable[[], float]


class TokenBucket:
    """A bucket of ``burst`` tokens refilled at ``rate`` tokens per second; starts full.

    Over any window of ``w`` seconds at most ``burst + rate * w`` tokens can be taken.

    Args:
        rate: tokens per second (> 0).
        burst: capacity (>= 1).
        clock: monotonic seconds.

    Raises:
        InvalidArgument: a rate or burst out of range.
    """

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise InvalidArgument(f"token bucket rate must be > 0, got {rate!r}")
        if burst < 1:
            raise InvalidArgument(f"token bucket burst must be >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> float:
        now = self._clock()
        elapsed = now - self._last
        if elapsed > 0:  # a clock that steps back refills nothing
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
            self._last = now
        return self._tokens

    @property
    def tokens(self) -> float:
        """Tokens available now (fractional while refilling)."""
        return self._refill()

    def available(self) -> bool:
        """Whether a token could be taken now; takes nothing."""
        return self._refill() >= 1.0

    def try_take(self) -> bool:
        """Take one token; ``False`` (taking nothing) when the bucket is empty."""
        if self._refill() >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until one token is available (0.0 when one is now)."""
        tokens = self._refill()
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate


ACTIVE_WINDOW_S = 10.0  # a caller keeps its share this long after its last request
MAX_SHARES = 64  # callers holding a share of one total (beyond it, the least recent leaves)


class SharedBucket:
    """An endpoint's ``total`` limit, shared fairly among the callers that used it in the
    last ``ACTIVE_WINDOW_S`` seconds.

    The total's tokens (``rate`` per second, at most ``burst`` held) are dealt out as they
    accrue: each of the n active callers' shares gets ``rate / n`` and holds at most
    ``burst / n``; what a full share cannot hold spills into a common pool, which holds what
    the shares leave of ``burst``. A request takes from its caller's share, else from the
    pool. So the endpoint never serves more than ``burst + rate * w`` in any ``w`` seconds
    (every token is one of the total's), a caller is sure of ``rate / n`` (a noisy caller can
    no longer take the quiet ones' tokens, as first come, first served let it), and what a
    quiet caller leaves goes to the others (nothing is wasted). One caller alone gets it all.
    The shares are exact while ``burst >= n``; with fewer tokens than callers, the pool alone
    serves them (first come, first served).

    Only authenticated requests (``wait``/``take``) make a caller active; ``check``, before
    the seal is verified, counts nobody, so forged caller names cannot dilute the shares.

    Args:
        rate: the total's tokens per second.
        burst: the total's capacity.
        clock: monotonic seconds.
    """

    __slots__ = ("_clock", "_last", "_pool", "_shares", "burst", "rate")

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic) -> None:
        TokenBucket(rate, burst)  # the same checks of rate and burst
        self.rate, self.burst = float(rate), int(burst)
        self._clock = clock
        self._last = clock()
        self._pool = float(burst)  # starts full, held by nobody yet
        self._shares: OrderedDict[str, list[float]] = OrderedDict()  # caller: [tokens, seen]

    def _held(self) -> float:
        return sum(share[0] for share in self._shares.values())

    def _cap_pool(self) -> None:
        self._pool = min(self._pool, max(0.0, self.burst - self._held()))

    def _share_cap(self) -> float:
        # With fewer tokens than callers a share could never hold a whole token: the shares
        # hold nothing and the pool serves everyone (else no one would be served again).
        n = len(self._shares)
        return self.burst / n if self.burst >= n else 0.0

    def _refill(self, now: float) -> None:
        elapsed = now - self._last
        if elapsed <= 0:  # a clock that steps back refills nothing
            return
        self._last = now
        added = elapsed * self.rate
        if not self._shares:
            self._pool = min(float(self.burst), self._pool + added)
            return
        cap, each = self._share_cap(), added / len(self._shares)
        for share in self._shares.values():
            tokens = share[0] + each
            if tokens > cap:
                self._pool += tokens - cap
                tokens = cap
            share[0] = tokens
        self._cap_pool()

    def _reshare(self) -> None:
        """After callers joined or left: shares above the new cap spill into the pool."""
        if self._shares:
            cap = self._share_cap()
            for share in self._shares.values():
                if share[0] > cap:
                    self._pool += share[0] - cap
                    share[0] = cap
        self._cap_pool()

    def _update(self, caller: str | None) -> list[float] | None:
        """Refill, drop the callers gone quiet, and (for an authenticated request) make
        ``caller`` active; its share, if it has one."""
        now = self._clock()
        self._refill(now)
        changed = False
        while self._shares:
            _, (tokens, seen) = next(iter(self._shares.items()))
            if now - seen <= ACTIVE_WINDOW_S and len(self._shares) <= MAX_SHARES:
                break
            self._shares.popitem(last=False)
            self._pool += tokens  # what it held goes back to everyone
            changed = True
        share = self._shares.get(caller) if caller is not None else None
        if caller is not None:
            if share is None:
                share = [0.0, now]  # a newcomer holds nothing yet: the pool serves it first
                changed = True
            share[1] = now
            self._shares[caller] = share
            self._shares.move_to_end(caller)
        if changed:
            self._reshare()
        return share

    def _wait(self, share: list[float] | None) -> float:
        if self._pool >= 1.0 or (share is not None and share[0] >= 1.0):
            return 0.0
        n = max(1, len(self._shares))
        if share is not None and self.burst / n >= 1.0:
            return (1.0 - share[0]) * n / self.rate  # until its own share has a token
        return (1.0 - self._pool) / self.rate

    def check(self, caller: str) -> float:
        """Seconds until ``caller`` could take a token (0.0: now); counts nobody as active.
        A caller not active yet is never refused here: its first authenticated request
        decides (else a newcomer could never get a share while the pool is empty)."""
        self._update(None)
        share = self._shares.get(caller)
        return 0.0 if share is None else self._wait(share)

    def wait(self, caller: str) -> float:
        """Like ``check``, for an authenticated request: ``caller`` counts as active."""
        return self._wait(self._update(caller))

    def take(self, caller: str) -> None:
        """Take a token for ``caller`` after ``wait`` returned 0.0: from its share if it has
        one, else from the pool."""
        share = self._update(caller)
        if share is not None and share[0] >= 1.0:
            share[0] -= 1.0
        elif self._pool >= 1.0:
            self._pool -= 1.0


BucketKey = tuple[str, str, str, str]


class RateLimiter:
    """The callee's token buckets: one per (caller, agent, endpoint) for ``per_caller`` and one
    per (agent, endpoint) for ``total`` (a ``SharedBucket``: fair among callers), made on first
    use and bounded in number (the least
    recently used bucket is dropped first; a dropped bucket comes back full).

    Two steps, on purpose. The callee calls ``check`` before decrypting a request (a cheap
    rejection that consumes nothing) and ``take`` only after the seal verified. The caller
    identity in a frame is only a claim until the seal is opened: a forger who attaches a
    victim's public certificate to junk frames would otherwise drain the victim's per-caller
    budget (and the endpoint's total) without holding its keys. Peeking first keeps rejection
    cheap under load; taking after verification means only authenticated requests spend tokens.

    When the policy's limit for a key changes (another rate or burst), that bucket is re-created,
    full, with the new settings.

    Args:
        clock: monotonic seconds.
        max_buckets: the most buckets kept.
    """

    def __init__(self, *, clock: Clock = time.monotonic, max_buckets: int = 10_000) -> None:
        if max_buckets < 2:
            raise InvalidArgument(f"max_buckets must be >= 2, got {max_buckets!r}")
        self._clock = clock
        self._max = max_buckets
        self._buckets: OrderedDict[BucketKey, TokenBucket | SharedBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _keys(
        self,
        caller: str,
        agent: str,
        endpoint: str,
        limit: RateLimitSpec,
        origin: str | None = None,
    ) -> list[tuple[BucketKey, float, int]]:
        out: list[tuple[BucketKey, float, int]] = []
        if limit.per_caller is not None:
            out.append((("caller", caller, agent, endpoint), limit.per_caller, limit.caller_burst))
        if limit.total is not None:
            out.append((("total", "", agent, endpoint), limit.total, limit.total_capacity))
        if limit.per_origin is not None and origin is not None:
            out.append((("origin", origin, agent, endpoint), limit.per_origin, limit.origin_burst))
        return out

    def _existing(
        self, key: BucketKey, rate: float, burst: int
    ) -> TokenBucket | SharedBucket | None:
        """The live bucket for ``key`` if it has these settings (``None``: missing or stale,
        which means it would start full)."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            return None
        return bucket

    def check(
        self, caller: str, agent: str, endpoint: str, limit: RateLimitSpec | None
    ) -> float | None:
        """Whether a request would pass, consuming nothing and creating no bucket.

        Returns:
            ``None`` when both buckets have a token (or there is no limit), else the seconds
            until both will.
        """
        if limit is None:
            return None
        wait = 0.0
        for key, rate, burst in self._keys(caller, agent, endpoint, limit):
            bucket = self._existing(key, rate, burst)
            if isinstance(bucket, SharedBucket):
                wait = max(wait, bucket.check(caller))
            elif bucket is not None:
                wait = max(wait, bucket.retry_after())
        return wait if wait > 0 else None

    def take(
        self,
        caller: str,
        agent: str,
        endpoint: str,
        limit: RateLimitSpec | None,
        origin: str | None = None,
    ) -> float | None:
        """Take one token from the per-caller, the total and the per-origin bucket, or from
        none. ``origin``: who the call is on behalf of (its delegation chain's origin, or the
        caller); only known after the seal opened, so ``check`` never looks at it.

        Returns:
            ``None`` when the tokens were taken (or there is no limit), else the seconds until
            both buckets have a token (nothing is taken).
        """
        if limit is None:
            return None
        buckets: list[TokenBucket | SharedBucket] = []
        wait = 0.0
        for key, rate, burst in self._keys(caller, agent, endpoint, limit, origin):
            bucket = self._existing(key, rate, burst)
            if bucket is None:
                shared = key[0] == "total"
                bucket = (SharedBucket if shared else TokenBucket)(rate, burst, clock=self._clock)
                self._buckets[key] = bucket
                while len(self._buckets) > self._max:
                    self._buckets.popitem(last=False)
            self._buckets.move_to_end(key)
            buckets.append(bucket)
            if isinstance(bucket, SharedBucket):
                wait = max(wait, bucket.wait(caller))
            else:
                wait = max(wait, bucket.retry_after())
        if wait > 0:
            return wait
        for bucket in buckets:
            if isinstance(bucket, SharedBucket):
                bucket.take(caller)
            else:
                bucket.try_take()
        return None
