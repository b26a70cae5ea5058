"""Unit tests for mesh.ratelimit: token buckets and the callee's two-step rate limiter."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh._core.policy import RateLimitSpec
from mesh._core.ratelimit import ACTIVE_WINDOW_S, RateLimiter, TokenBucket
from mesh.errors import InvalidArgument
from mesh.testing import FakeClock


def spec(**fields: Any) -> RateLimitSpec:
    return RateLimitSpec.model_validate(fields)


class TestTokenBucket:
    def test_burst_then_refill(self) -> None:
        """A full bucket gives ``burst`` tokens at once, then one per 1/rate seconds."""
        clock = FakeClock()
        b = TokenBucket(2.0, 3, clock=clock)

        assert [b.try_take() for _ in range(4)] == [True, True, True, False]
        clock.advance(0.25)
        assert not b.try_take()
        clock.advance(0.25)
        assert b.try_take()
        assert not b.try_take()
        clock.advance(100.0)
        assert [b.try_take() for _ in range(4)] == [True, True, True, False]  # capped at burst

    def test_retry_after(self) -> None:
        clock = FakeClock()
        b = TokenBucket(4.0, 1, clock=clock)

        assert b.retry_after() == 0.0
        assert b.try_take()
        assert b.retry_after() == pytest.approx(0.25)
        clock.advance(0.1)
        assert b.retry_after() == pytest.approx(0.15)
        clock.advance(0.15)
        assert b.retry_after() == 0.0
        assert b.try_take()

    def test_available_consumes_nothing(self) -> None:
        clock = FakeClock()
        b = TokenBucket(1.0, 2, clock=clock)

        assert all(b.available() for _ in range(100))
        assert b.tokens == 2.0
        assert b.try_take() and b.try_take()
        assert not b.available()
        assert b.retry_after() == pytest.approx(1.0)

    def test_clock_stepping_back_refills_nothing(self) -> None:
        clock = FakeClock()
        b = TokenBucket(1.0, 1, clock=clock)
        assert b.try_take()

        clock.advance(-50.0)
        assert not b.try_take()
        clock.advance(50.5)
        assert not b.try_take()
        clock.advance(0.5)
        assert b.try_take()

    @pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (float("nan"), 1), (1.0, 0)])
    def test_invalid(self, rate: float, burst: int) -> None:
        with pytest.raises(InvalidArgument):
            TokenBucket(rate, burst)


class TestRateLimiter:
    def test_no_limit(self) -> None:
        rl = RateLimiter(clock=FakeClock())

        assert rl.check("a", "x", "e", None) is None
        assert all(rl.take("a", "x", "e", None) is None for _ in range(1000))
        assert len(rl) == 0

    def test_check_consumes_nothing_and_creates_nothing(self) -> None:
        clock = FakeClock()
        rl = RateLimiter(clock=clock)
        limit = spec(per_caller="1/s", burst=2, total="10/s")

        assert all(rl.check("a", "x", "e", limit) is None for _ in range(100))
        assert len(rl) == 0
        assert rl.take("a", "x", "e", limit) is None
        assert all(rl.check("a", "x", "e", limit) is None for _ in range(100))
        assert rl.take("a", "x", "e", limit) is None
        assert rl.check("a", "x", "e", limit) == pytest.approx(1.0)
        assert rl.take("a", "x", "e", limit) == pytest.approx(1.0)

    def test_per_caller_limits_are_independent(self) -> None:
        clock = FakeClock()
        rl = RateLimiter(clock=clock)
        limit = spec(per_caller="2/s")

        assert [rl.take("a", "x", "e", limit) for _ in range(3)] == [None, None, 0.5]
        assert [rl.take("b", "x", "e", limit) for _ in range(2)] == [None, None]
        assert rl.take("a", "x", "other", limit) is None  # per endpoint, too
        assert rl.take("a", "y", "e", limit) is None  # and per callee agent
        clock.advance(0.5)
        assert rl.take("a", "x", "e", limit) is None

    def test_total_limit_is_shared(self) -> None:
        clock = FakeClock()
        rl = RateLimiter(clock=clock)
        limit = spec(per_caller="10/s", total="3/s")

        assert [rl.take(c, "x", "e", limit) for c in "abc"] == [None, None, None]
        # d has no share yet: the peek before decryption lets it through (a newcomer refused
        # there would never get a share); its authenticated take is refused.
        assert rl.check("d", "x", "e", limit) is None
        assert rl.take("d", "x", "e", limit) == pytest.approx(1 / 3)
        assert rl.check("d", "x", "e", limit) == pytest.approx(1 / 3)  # now it is active
        assert rl.take("a", "x", "other", limit) is None  # another endpoint has its own total

    def test_take_takes_from_both_or_neither(self) -> None:
        """When the total is empty, the caller's own bucket keeps its tokens."""
        clock = FakeClock()
        rl = RateLimiter(clock=clock)
        limit = spec(per_caller="1/s", burst=2, total="1/s", total_burst=1)

        assert rl.take("a", "x", "e", limit) is None
        assert rl.take("a", "x", "e", limit) == pytest.approx(1.0)  # total empty
        assert rl._buckets["caller", "a", "x", "e"].tokens == pytest.approx(1.0)  # untouched
        clock.advance(1.0)
        assert rl.take("a", "x", "e", limit) is None

    def test_retry_after_is_the_longer_wait(self) -> None:
        clock = FakeClock()
        rl = RateLimiter(clock=clock)
        limit = spec(per_caller="1/s", burst=1, total="4/s", total_burst=1)

        assert rl.take("a", "x", "e", limit) is None
        assert rl.check("a", "x", "e", limit) == pytest.approx(1.0)
        assert rl.check("b", "x", "e", limit) is None  # not active yet: its take decides
        assert rl.take("b", "x", "e", limit) == pytest.approx(0.25)

    def test_limit_change_recreates_the_bucket(self) -> None:
        clock = FakeClock()
        rl = RateLimiter(clock=clock)
        slow = spec(per_caller="1/m")
        fast = spec(per_caller="5/s")

        assert rl.take("a", "x", "e", slow) is None
        assert rl.take("a", "x", "e", slow) == pytest.approx(60.0)
        assert rl.check("a", "x", "e", fast) is None  # a new limit starts full
        assert [rl.take("a", "x", "e", fast) for _ in range(6)] == [None] * 5 + [pytest.approx(0.2)]
        assert rl.take("a", "x", "e", spec(per_caller="5/s", burst=1)) is None  # burst changed
        assert len(rl) == 1

    def test_buckets_are_bounded_lru(self) -> None:
        clock = FakeClock()
        rl = RateLimiter(clock=clock, max_buckets=3)
        limit = spec(per_caller="1/h")

        for caller in "abc":
            assert rl.take(caller, "x", "e", limit) is None
        assert rl.take("a", "x", "e", limit) is not None  # a is now the most recent
        assert rl.take("d", "x", "e", limit) is None  # evicts b, the least recent
        assert len(rl) == 3
        assert rl.take("a", "x", "e", limit) is not None  # still there, still empty
        assert rl.take("c", "x", "e", limit) is not None
        assert rl.take("b", "x", "e", limit) is None  # b came back full

    def test_invalid_bound(self) -> None:
        with pytest.raises(InvalidArgument):
            RateLimiter(max_buckets=1)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0, 250.0]),
    burst=st.integers(1, 8),
    steps=st.lists(
        st.tuples(st.floats(0.0, 2.0, allow_nan=False), st.booleans()), min_size=1, max_size=80
    ),
)
def test_takes_never_exceed_burst_plus_rate_times_window(
    rate: float, burst: int, steps: list[tuple[float, bool]]
) -> None:
    """Over any sequence of take()/check() calls at any times, the tokens taken in any window
    [t_i, t_j] never exceed burst + rate * (t_j - t_i); check() never changes that."""
    clock = FakeClock(0.0)
    rl = RateLimiter(clock=clock)
    limit = spec(per_caller=rate, burst=burst, total=rate, total_burst=burst)
    taken: list[float] = []

    for dt, peek_first in steps:
        clock.advance(dt)
        if peek_first:
            rl.check("a", "x", "e", limit)
        if rl.take("a", "x", "e", limit) is None:
            taken.append(clock.now)

    for i in range(len(taken)):
        for j in range(i, len(taken)):
            count = j - i + 1
            assert count <= burst + rate * (taken[j] - taken[i]) + 1e-6


def simulate(
    rates: dict[str, float], limit: RateLimitSpec, seconds: float = 30.0
) -> dict[str, tuple[int, int, float]]:
    """Callers sending at random (Poisson, seeded) at ``rates`` (requests per second) for
    ``seconds`` against one endpoint: per caller, (sent, served, when it was last refused)."""
    clock = FakeClock(0.0)
    rl = RateLimiter(clock=clock)
    rng = random.Random(7)
    arrivals: list[tuple[float, str]] = []
    for caller, rate in rates.items():
        at = rng.expovariate(rate)
        while at < seconds:
            arrivals.append((at, caller))
            at += rng.expovariate(rate)
    arrivals.sort()
    result = {caller: [0, 0, 0.0] for caller in rates}
    for at, caller in arrivals:
        clock.now = at
        result[caller][0] += 1
        if rl.take(caller, "x", "e", limit) is None:
            result[caller][1] += 1
        else:
            result[caller][2] = at
    return {caller: (int(a), int(b), c) for caller, (a, b, c) in result.items()}


class TestSharedTotal:
    """The total is shared max-min fairly among active callers, never exceeded, never wasted."""

    def test_a_quiet_caller_keeps_its_calls_while_a_noisy_one_floods(self) -> None:
        """10/s shared; a noisy caller at 100/s and a quiet one at 2/s (within its fair share
        of 5/s): once its share has built up (a newcomer holds nothing; the noisy caller had
        taken the pool) the quiet one is served every time (first come, first served served 6
        of these 73), the noisy one gets the rest of the 10/s, and the total holds."""
        got = simulate({"noisy": 100.0, "quiet": 2.0}, spec(total="10/s"))
        sent, served, last_refused = got["quiet"]
        assert sent > 40 and served >= sent - 3 and last_refused < 2.0, got
        noisy = got["noisy"][1]
        assert noisy >= 30 * 10 - served - 15, got  # what the quiet caller leaves is used
        assert noisy + served <= 30 * 10 + 10, got  # burst + rate * window

    def test_two_noisy_callers_split_the_total_evenly(self) -> None:
        got = simulate({"a": 50.0, "b": 200.0}, spec(total="10/s"))
        served = {caller: served for caller, (_, served, _) in got.items()}
        assert abs(served["a"] - served["b"]) <= 15, served
        assert sum(served.values()) <= 30 * 10 + 10

    def test_one_caller_alone_gets_the_whole_total(self) -> None:
        assert simulate({"a": 40.0}, spec(total="10/s"))["a"][1] >= 30 * 10

    def test_a_caller_that_went_quiet_gives_its_share_back(self) -> None:
        """After ACTIVE_WINDOW_S without a request a caller no longer holds a share."""
        clock = FakeClock(0.0)
        rl = RateLimiter(clock=clock)
        limit = spec(total="4/s", total_burst=4)
        assert rl.take("gone", "x", "e", limit) is None
        clock.advance(ACTIVE_WINDOW_S + 1)
        assert [rl.take("a", "x", "e", limit) for _ in range(4)] == [None] * 4

    def test_peeking_registers_no_caller(self) -> None:
        """check() (before the seal is verified) cannot make a forged caller name dilute the
        shares: only take() counts a caller as active."""
        clock = FakeClock(0.0)
        rl = RateLimiter(clock=clock)
        limit = spec(total="4/s", total_burst=4)
        for n in range(50):
            rl.check(f"forged-{n}", "x", "e", limit)
        assert [rl.take("a", "x", "e", limit) for _ in range(4)] == [None] * 4


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0, 250.0]),
    burst=st.integers(1, 8),
    steps=st.lists(
        st.tuples(st.floats(0.0, 2.0, allow_nan=False), st.sampled_from("abcd"), st.booleans()),
        min_size=1,
        max_size=80,
    ),
)
def test_a_shared_total_never_exceeds_burst_plus_rate_times_window(
    rate: float, burst: int, steps: list[tuple[float, str, bool]]
) -> None:
    """However callers come and go (check() or take(), any order and times), the total's
    takes in any window [t_i, t_j] stay within burst + rate * (t_j - t_i)."""
    clock = FakeClock(0.0)
    rl = RateLimiter(clock=clock)
    limit = spec(total=rate, total_burst=burst)
    taken: list[float] = []
    for dt, caller, peek_first in steps:
        clock.advance(dt)
        if peek_first:
            rl.check(caller, "x", "e", limit)
        if rl.take(caller, "x", "e", limit) is None:
            taken.append(clock.now)
    for i in range(len(taken)):
        for j in range(i, len(taken)):
            assert j - i + 1 <= burst + rate * (taken[j] - taken[i]) + 1e-6
