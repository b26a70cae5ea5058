"""Traffic management primitives: circuit breakers, outlier ejection, latency-aware balancing,
weighted splits and consistent hashing.

Each takes an injectable clock (and random source) so tests need no sleeps. Pure core: no I/O.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from mesh._core.resilience import two_choices

__all__ = [
    "CLOSED",
    "FAILURE_CODES",
    "HALF_OPEN",
    "OPEN",
    "CircuitBreaker",
    "OutlierDetector",
    "PeakEwmaPicker",
    "is_failure",
    "rendezvous_pick",
    "weighted_choice",
]

Clock = Callable[[], float]
T = TypeVar("T")
C = TypeVar("C")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

FAILURE_CODES: frozenset[str] = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"})


def is_failure(code: str) -> bool:
    """Whether an attempt that ended with ``code`` counts as a failure of the callee.

    Only the analogues of Envoy's gateway errors and locally originated failures count. A client
    error (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, RESOURCE_EXHAUSTED...) is the callee
    working as designed, and never trips a circuit or ejects an instance.
    """
    return code in FAILURE_CODES


class CircuitBreaker:
    """A per-destination circuit: CLOSED, OPEN after consecutive failures, then HALF_OPEN.

    Once the open time has passed ``admit`` lets exactly one probe through. The first outcome
    ``record``-ed while that probe is out decides, as in Hystrix: a success closes the circuit
    (and resets the openings count), a failure reopens it for twice as long. So no probe flag is
    threaded through the caller; the price is that a slow call admitted before the circuit opened
    may decide instead of the probe, whose own outcome is then an ordinary one. Outcomes recorded
    while open, or half open with no probe out, are ignored. A probe that never reports holds its
    lease for ``probe_timeout`` seconds; after that the next caller becomes the probe.

    Opening ``n`` lasts ``min(max_open_for, open_for * 2**(n-1)) * uniform(0.8, 1.0)``: enough
    jitter that agents opened by the same outage do not probe in step, but not full jitter, which
    could make an opening last almost nothing and so hammer a failing callee.

    Args:
        consecutive_failures: failures in a row that open a closed circuit (default 5).
        open_for: seconds the first opening lasts (default 1).
        max_open_for: the longest opening, before jitter (default 60).
        probe_timeout: seconds a probe's lease lasts (default 30).
    """

    __slots__ = (
        "_clock",
        "_failures",
        "_open_until",
        "_opened_at",
        "_openings",
        "_probe_at",
        "_rng",
        "consecutive_failures",
        "max_open_for",
        "open_for",
        "probe_timeout",
    )

    def __init__(
        self,
        consecutive_failures: int = 5,
        open_for: float = 1.0,
        max_open_for: float = 60.0,
        *,
        probe_timeout: float = 30.0,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.consecutive_failures = consecutive_failures
        self.open_for = open_for
        self.max_open_for = max_open_for
        self.probe_timeout = probe_timeout
        self._clock = clock
        self._rng = rng or random.Random()
        self._failures = 0
        self._openings = 0
        self._opened_at: float | None = None
        self._open_until = 0.0
        self._probe_at: float | None = None

    @property
    def openings(self) -> int:
        """Openings since the circuit last closed (0 when closed)."""
        return self._openings

    @property
    def opened_at(self) -> float | None:
        """Clock reading when the circuit last opened; ``None`` when closed."""
        return self._opened_at

    def _state(self, now: float) -> str:
        if self._opened_at is None:
            return CLOSED
        return OPEN if now < self._open_until else HALF_OPEN

    @property
    def state(self) -> str:
        """CLOSED, OPEN or HALF_OPEN (an open circuit whose open time has passed is half open)."""
        return self._state(self._clock())

    def _wait(self, now: float) -> float:
        state = self._state(now)
        if state == OPEN:
            return self._open_until - now
        if state == HALF_OPEN and self._probe_at is not None:
            lease_left = self._probe_at + self.probe_timeout - now
            if lease_left > 0:
                return min(self.open_for, lease_left)
        return 0.0

    @property
    def retry_after(self) -> float:
        """Seconds until ``admit`` may let a call through (0 when it would now)."""
        return self._wait(self._clock())

    def admit(self) -> float | None:
        """``None`` when a call may go, else seconds (> 0) until the circuit may be tried.

        While a probe is out that is ``open_for``, or the rest of the probe's lease if shorter.
        """
        now = self._clock()
        wait = self._wait(now)
        if wait > 0:
            return wait
        if self._opened_at is not None:
            self._probe_at = now  # this caller is the probe
        return None

    def record(self, failed: bool) -> None:
        """Record the outcome of an admitted call (``failed`` as judged by ``is_failure``)."""
        now = self._clock()
        state = self._state(now)
        if state == CLOSED:
            self._failures = self._failures + 1 if failed else 0
            if self._failures >= self.consecutive_failures:
                self._open(now)
        elif state == HALF_OPEN and self._probe_at is not None:
            if failed:
                self._open(now)
            else:
                self._opened_at = self._probe_at = None
                self._openings = self._failures = 0

    def abandon(self) -> None:
        """An admitted call ended with no outcome (cancelled): if the circuit waits on a probe,
        the next caller becomes the probe at once instead of after ``probe_timeout``."""
        self._probe_at = None

    def _open(self, now: float) -> None:
        self._openings += 1
        base = min(self.max_open_for, self.open_for * 2.0 ** min(self._openings - 1, 64))
        self._opened_at = now
        self._open_until = now + base * self._rng.uniform(0.8, 1.0)
        self._probe_at = None  # (the failure count restarts when the circuit closes)


@dataclass(slots=True)
class _Host:
    settled_at: float  # when ``times`` last dropped, or the instance last came back
    failures: int = 0  # consecutive
    times: int = 0  # the ejection multiplier
    until: float | None = None  # when the current ejection ends


class OutlierDetector(Generic[T]):
    """Ejects instances that fail repeatedly, with Envoy's outlier detection semantics.

    ``consecutive_failures`` failures in a row eject an instance for ``base_ejection *
    times_ejected`` seconds (at most ``max_ejection``), unless ``max(1, floor(population *
    max_ejection_percent / 100))`` are already ejected (as in Envoy, one always may be). It
    returns when its time is up (checked lazily), and its multiplier drops by one for each whole
    ``base_ejection`` it then spends in service. Outcomes recorded while ejected are ignored.
    State is kept for at most ``max_keys`` instances: past that the least recently recorded one
    in service is forgotten (the oldest if all are ejected).

    Args:
        consecutive_failures: failures in a row that eject an instance (default 5).
        base_ejection: seconds of the first ejection, > 0 (default 30).
        max_ejection_percent: percent of the population that may be ejected at once (default 10).
        max_ejection: the longest ejection in seconds (default 300).
        max_keys: instances to keep state for (default 4096).
    """

    __slots__ = (
        "_clock",
        "_hosts",
        "_last_return",
        "base_ejection",
        "consecutive_failures",
        "max_ejection",
        "max_ejection_percent",
        "max_keys",
    )

    def __init__(
        self,
        consecutive_failures: int = 5,
        base_ejection: float = 30.0,
        max_ejection_percent: float = 10,
        max_ejection: float = 300.0,
        *,
        max_keys: int = 4096,
        clock: Clock = time.monotonic,
    ) -> None:
        self.consecutive_failures = consecutive_failures
        self.base_ejection = base_ejection
        self.max_ejection_percent = max_ejection_percent
        self.max_ejection = max_ejection
        self.max_keys = max_keys
        self._clock = clock
        self._hosts: dict[T, _Host] = {}
        self._last_return = -math.inf  # when the last ejection in force ends

    def _settle(self, host: _Host, now: float) -> None:
        if host.until is not None:
            if now < host.until:
                return
            host.settled_at, host.until, host.failures = host.until, None, 0
        periods = int((now - host.settled_at) // self.base_ejection)
        if periods > 0:
            host.times = max(0, host.times - periods)
            host.settled_at += periods * self.base_ejection

    def record(self, key: T, failed: bool, population: int) -> bool:
        """Record an attempt's outcome on instance ``key``; ``True`` when this ejected it.

        Args:
            key: the instance.
            failed: whether the attempt failed (see ``is_failure``).
            population: live instances of the destination, ejected ones included.
        """
        now = self._clock()
        host = self._hosts.pop(key, None)
        if host is None:
            host = _Host(now)
            if len(self._hosts) >= self.max_keys:
                items = self._hosts.items()
                idle = (k for k, h in items if h.until is None or h.until <= now)
                del self._hosts[next(idle, next(iter(self._hosts)))]
        self._hosts[key] = host  # most recently recorded last
        self._settle(host, now)
        if host.until is not None:
            return False
        host.failures = host.failures + 1 if failed else 0
        if host.failures < self.consecutive_failures:
            return False
        if len(self.ejected()) >= max(1, math.floor(population * self.max_ejection_percent / 100)):
            return False
        host.times += 1
        host.until = now + min(self.max_ejection, self.base_ejection * host.times)
        self._last_return = max(self._last_return, host.until)
        return True  # (its failure count restarts when it returns: ``_settle``)

    def is_ejected(self, key: T) -> bool:
        """Whether ``key`` is ejected now."""
        host = self._hosts.get(key)
        if host is None:
            return False
        self._settle(host, self._clock())
        return host.until is not None

    def ejected(self) -> dict[T, float]:
        """The ejected instances, each with the seconds its ejection has left."""
        now = self._clock()
        hosts = self._hosts.items()
        return {k: h.until - now for k, h in hosts if h.until is not None and now < h.until}

    def forget(self, key: T) -> None:
        """Drop the state of ``key`` (an instance that left the directory)."""
        self._hosts.pop(key, None)

    def filter(self, candidates: Sequence[C], key: Callable[[C], T]) -> list[C]:
        """The candidates not ejected, or all of them when none is left (panic mode).

        As Envoy routes to every host when too many are unhealthy: better to try ejected
        instances than to refuse the call outright.
        """
        if self._clock() >= self._last_return:  # nothing ejected: the common case, no lookups
            return list(candidates)
        live = [c for c in candidates if not self.is_ejected(key(c))]
        return live or list(candidates)


class PeakEwmaPicker(Generic[T]):
    """Linkerd's default balancer (Finagle's peak EWMA): power of two choices on estimated cost.

    Cost is ``rtt * (outstanding + 1)``. A latency sample above the rtt estimate replaces it at
    once (the peak); one below is blended in with weight ``1 - exp(-elapsed / decay)``, elapsed
    being the seconds since the key's previous sample. A key never observed is estimated at
    ``default_rtt``; its first sample replaces that. Between samples the estimate relaxes toward
    ``default_rtt`` with the same time constant, so an instance left idle after a slow spell is
    tried again (relaxing toward zero, as Finagle does, would make its outstanding count for
    nothing and send it a burst). ``acquire``, ``release`` and ``penalize`` mean what they mean
    for ``LeastLoadedPicker``; a penalized key loses to any key that is not. Estimates and
    penalties are kept for at most ``max_keys`` keys each, the least recently set dropped first.

    Args:
        decay: the time constant in seconds (default 10, Linkerd's).
        default_rtt: the estimate of a key never observed (default 30 ms, Linkerd's).
        max_keys: keys to keep estimates and penalties for (default 4096).
    """

    __slots__ = (
        "_clock",
        "_penalty_until",
        "_rng",
        "_rtt",
        "decay",
        "default_rtt",
        "max_keys",
        "outstanding",
    )

    def __init__(
        self,
        decay: float = 10.0,
        default_rtt: float = 0.030,
        *,
        max_keys: int = 4096,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.decay = decay
        self.default_rtt = default_rtt
        self.max_keys = max_keys
        self._rng = rng or random.Random()
        self._clock = clock
        self.outstanding: dict[T, int] = {}
        self._rtt: dict[T, tuple[float, float]] = {}  # key -> (estimate, when last observed)
        self._penalty_until: dict[T, float] = {}

    def _estimate(self, key: T, now: float) -> float:
        seen = self._rtt.get(key)
        if seen is None:
            return self.default_rtt
        estimate, stamp = seen
        w = math.exp(-max(0.0, now - stamp) / self.decay)
        return estimate * w + self.default_rtt * (1.0 - w)

    def rtt(self, key: T) -> float:
        """The rtt estimate of ``key`` that its cost uses now, in seconds."""
        return self._estimate(key, self._clock())

    def _cost(self, key: T, now: float) -> tuple[bool, float]:
        until = self._penalty_until.get(key, now)
        if until <= now:
            self._penalty_until.pop(key, None)
        return until > now, self._estimate(key, now) * (self.outstanding.get(key, 0) + 1)

    def pick(self, candidates: Sequence[C], key: Callable[[C], T] | None = None) -> C:
        """Choose one of ``candidates`` (must not be empty).

        Args:
            candidates: what to choose from.
            key: maps a candidate to the key its state is kept under (default: itself).
        """
        if len(candidates) == 1:
            return candidates[0]
        a, b = two_choices(self._rng, candidates)
        ka, kb = (a, b) if key is None else (key(a), key(b))
        now = self._clock()
        return a if self._cost(ka, now) <= self._cost(kb, now) else b  # type: ignore[arg-type]

    def observe(self, key: T, seconds: float) -> None:
        """Record one attempt's latency on ``key``."""
        now = self._clock()
        seconds = max(0.0, seconds)
        seen = self._rtt.pop(key, None)
        if seen is None or seconds > seen[0]:
            estimate = seconds
        else:
            w = math.exp(-max(0.0, now - seen[1]) / self.decay)
            estimate = seen[0] * w + seconds * (1.0 - w)
        self._rtt[key] = (estimate, now)
        if len(self._rtt) > self.max_keys:
            del self._rtt[next(iter(self._rtt))]

    def acquire(self, key: T) -> None:
        self.outstanding[key] = self.outstanding.get(key, 0) + 1

    def release(self, key: T) -> None:
        left = self.outstanding.get(key, 0) - 1
        if left > 0:
            self.outstanding[key] = left
        else:
            self.outstanding.pop(key, None)

    def penalize(self, key: T, seconds: float) -> None:
        """Make ``key`` look heavily loaded for ``seconds``."""
        self._penalty_until.pop(key, None)
        self._penalty_until[key] = self._clock() + seconds
        if len(self._penalty_until) > self.max_keys:
            del self._penalty_until[next(iter(self._penalty_until))]

    def forget(self, key: T) -> None:
        """Drop all state of ``key`` (an instance that left the directory)."""
        self._rtt.pop(key, None)
        self._penalty_until.pop(key, None)
        self.outstanding.pop(key, None)


def weighted_choice(weights: Sequence[int], u: float) -> int:
    """The index the uniform draw ``u`` picks, each with probability ``weight / sum(weights)``.

    Taking a draw (pass ``rng.random()``) rather than a random source makes it deterministic to
    test. Zero weights are never chosen.

    Args:
        weights: non-negative ints with a positive sum.
        u: a uniform draw in [0, 1).

    Raises:
        ValueError: a weight is negative, the sum is not positive or ``u`` is outside [0, 1).
    """
    cumulative = list(itertools.accumulate(weights))
    if not cumulative or cumulative[-1] <= 0 or min(weights) < 0 or not 0.0 <= u < 1.0:
        raise ValueError("weights must be non-negative with a positive sum, and 0 <= u < 1")
    # bisect_right skips entries whose running total equals the one before: the zero weights
    return bisect.bisect_right(cumulative, min(int(u * cumulative[-1]), cumulative[-1] - 1))


def rendezvous_pick(key: str, candidates: Sequence[C], name: Callable[[C], str]) -> C:
    """The candidate ``key`` has affinity to, by highest random weight (rendezvous hashing).

    Each candidate scores the first 8 bytes, big-endian, of ``blake2b(key + "\\x00" + name)``;
    the highest wins (the first of equal scores). Rendezvous rather than a hash ring: there are
    no virtual nodes to tune, adding or removing a candidate moves only the keys that must move,
    and O(n) per pick is nothing for the handful of instances an agent sees.

    Raises:
        ValueError: ``candidates`` is empty.
    """

    def score(candidate: C) -> int:
        digest = hashlib.blake2b(f"{key}\x00{name(candidate)}".encode()).digest()
        return int.from_bytes(digest[:8], "big")

    return max(candidates, key=score)
